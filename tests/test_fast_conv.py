"""The NNPACK Winograd 3x3 convolution (tokenizer/utils/fast_conv.py) against ATen's direct convolution and float64:
forward, input / weight / bias gradients, the fallbacks, and the modules that use it (pixel decoder, LPIPS); the
low-resolution form of upsample-then-convolve against the literal upsample + convolution in float64."""
import pytest
import torch
import torch.nn.functional as F

from vfmtok.tokenizer.layers import PixelDecoder
from vfmtok.tokenizer.lpips import LPIPS
from vfmtok.tokenizer.utils.fast_conv import (Conv3x3, fast_conv, fast_conv_enabled, upsample2x_conv3x3, uses_fast_path,
                                      winograd_conv3x3)

needs_nnpack = pytest.mark.skipif(not torch._nnpack_available(), reason="this torch build has no NNPACK")


@pytest.fixture(autouse=True)
def fast_path_on():
    """The fast path is opt-in (VFMTOK_FAST_CONV=1): these tests check it, so they turn it on."""
    with fast_conv(True):
        yield


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _conv_and_grads(x, weight, bias, fn, probe):
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    out = fn(x, weight, bias)
    (out * probe.to(out.dtype)).sum().backward()
    return out.detach(), x.grad, weight.grad, bias.grad


@needs_nnpack
@pytest.mark.parametrize("batch,cin,cout,size", [(1, 32, 64, 20), (3, 64, 32, 13), (2, 16, 16, 7)])
def test_forward_and_gradients_match_direct_convolution(batch, cin, cout, size):
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size)
    weight = torch.randn(cout, cin, 3, 3) * (9 * cin) ** -0.5
    bias = torch.randn(cout)
    probe = torch.randn(batch, cout, size, size)
    assert uses_fast_path(x.requires_grad_(), weight)
    fast = _conv_and_grads(x, weight, bias, winograd_conv3x3, probe)
    direct = _conv_and_grads(x, weight, bias, lambda a, w, b: F.conv2d(a, w, b, padding=1), probe)
    exact = _conv_and_grads(x.double(), weight.double(), bias.double(),
                            lambda a, w, b: F.conv2d(a, w, b, padding=1), probe.double())
    for name, f, d, e in zip(("output", "input grad", "weight grad", "bias grad"), fast, direct, exact):
        assert f.dtype == torch.float32 and f.shape == d.shape, name
        # fp32 tolerance: within 1e-4 of the magnitude (Winograd: about 1e-5, the direct convolution about 3e-7)
        assert _relative(f, e) < 1e-4, name
        assert _relative(d, e) < 1e-5, name


@needs_nnpack
def test_fallbacks_are_the_plain_convolution():
    torch.manual_seed(0)
    conv = Conv3x3(8, 8)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    assert uses_fast_path(x, conv.weight)
    with torch.no_grad():  # inference: ATen's convolution, bit for bit
        assert not uses_fast_path(x, conv.weight)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    with fast_conv(False):
        assert not fast_conv_enabled() and not uses_fast_path(x, conv.weight)
        assert torch.equal(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
    assert fast_conv_enabled()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not uses_fast_path(x, conv.weight)
        assert conv(x).dtype == torch.bfloat16
    assert not uses_fast_path(x.double(), conv.weight.double())
    assert not uses_fast_path(x.detach(), conv.weight.detach())


def test_conv3x3_is_a_conv2d_with_the_same_state_dict():
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(4, 6, 3, padding=1)
    torch.manual_seed(0)
    fast = Conv3x3(4, 6)
    assert isinstance(fast, torch.nn.Conv2d)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))


@needs_nnpack
def test_pixel_decoder_training_step_matches_the_plain_path():
    """A small pixel decoder: output, input gradient and every weight gradient, fast vs direct convolutions."""
    torch.manual_seed(0)
    decoder = PixelDecoder(64, 32, (1, 2, 2), 1)
    z = torch.randn(2, 64, 6, 6)
    probe = torch.randn(2, 3, 24, 24)

    def run(enabled):
        decoder.zero_grad(set_to_none=True)
        zz = z.clone().requires_grad_()
        with fast_conv(enabled):
            out = decoder(zz)
        (out * probe).sum().backward()
        return out.detach(), zz.grad, {n: p.grad for n, p in decoder.named_parameters()}

    fast, plain = run(True), run(False)
    assert _relative(fast[0], plain[0]) < 1e-4 and _relative(fast[1], plain[1]) < 1e-4
    largest = max(grad.abs().max().item() for grad in plain[2].values())
    for name, grad in plain[2].items():  # some are zero up to rounding (the attention's key bias), biases are sums
        torch.testing.assert_close(fast[2][name], grad, rtol=1e-3, atol=1e-5 * largest, msg=name)


@needs_nnpack
def test_lpips_training_loss_matches_the_single_pass():
    """Separate passes for a reconstruction that needs a gradient (and a target that does not) give the distance and
    the input gradient of the plain one-pass LPIPS."""
    torch.manual_seed(0)
    lpips = LPIPS()
    recon = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    target = torch.rand(2, 3, 32, 32) * 2 - 1
    d = lpips(recon, target)
    d.sum().backward()
    grad, recon.grad = recon.grad, None
    with fast_conv(False):
        both = lpips(recon, target.clone().requires_grad_())  # same requires_grad: the one-pass branch
        both.sum().backward()
    assert _relative(d.detach(), both.detach()) < 1e-4
    assert _relative(grad, recon.grad) < 1e-4
    with torch.no_grad():
        assert torch.allclose(lpips(recon, target), d.detach(), rtol=1e-4, atol=1e-6)


def _upsample_then_conv(x, weight, bias):
    """The literal form: build the 2x nearest-upsampled image, then convolve it."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


@pytest.mark.parametrize("batch,cin,cout,size,bias", [(1, 8, 16, 5, True), (2, 16, 8, 6, True), (3, 4, 4, 1, False),
                                                      (1, 32, 32, 21, True)])
def test_upsample_conv_at_low_resolution_is_upsample_then_conv(batch, cin, cout, size, bias):
    """Output and input / weight / bias gradients, odd and even sizes (borders), against float64 of the literal form."""
    torch.manual_seed(0)
    x = torch.randn(batch, cin, size, size)
    weight = torch.randn(cout, cin, 3, 3) * (9 * cin) ** -0.5
    b = torch.randn(cout) if bias else None
    probe = torch.randn(batch, cout, 2 * size, 2 * size)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, weight, b)]
        out = fn(*leaves)
        (out * probe.to(dtype)).sum().backward()
        return [out.detach()] + [t.grad for t in leaves if t is not None]

    fused, literal, exact = run(upsample2x_conv3x3, torch.float32), run(_upsample_then_conv, torch.float32), \
        run(_upsample_then_conv, torch.float64)
    assert fused[0].shape == (batch, cout, 2 * size, 2 * size)
    for name, f, l, e in zip(("output", "input grad", "weight grad", "bias grad"), fused, literal, exact):
        # as close to float64 as the literal fp32 form is (both are plain fp32 sums, in another order)
        assert _relative(f, e) < max(4 * _relative(l, e), 1e-6), name
        assert _relative(f, e) < 1e-5, name


def test_upsample_conv_phases_are_placed_on_the_right_pixels():
    """A kernel with a single non-zero tap shifts the upsampled image by one pixel: compare with the shift by hand."""
    x = torch.arange(12.0).view(1, 1, 3, 4)
    up = x.repeat_interleave(2, 2).repeat_interleave(2, 3)
    for i in range(3):
        for j in range(3):
            weight = torch.zeros(1, 1, 3, 3)
            weight[0, 0, i, j] = 1.0
            expected = F.pad(up, (1, 1, 1, 1))[:, :, i:i + 6, j:j + 8]  # out(p, q) = up(p + i - 1, q + j - 1)
            assert torch.equal(upsample2x_conv3x3(x, weight), expected), (i, j)


def test_upsample_conv_under_bf16_autocast_sums_the_taps_in_fp32():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(2, 8, 7, 7), torch.randn(8, 8, 3, 3) * 0.1, torch.randn(8)
    exact = _upsample_then_conv(x.double(), weight.double(), bias.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, literal = upsample2x_conv3x3(x, weight, bias), _upsample_then_conv(x, weight, bias)
    assert fused.dtype == literal.dtype == torch.bfloat16
    assert _relative(fused, exact) < 2 * _relative(literal, exact) + 1e-3


def test_upsample_module_uses_the_low_resolution_form_only_with_gradients(monkeypatch):
    """Training takes the fused form; no_grad (sampling, evaluation) takes the literal one, which is what makes images
    bit-equal across thread counts. Both compute the same function."""
    from vfmtok.tokenizer import layers

    torch.manual_seed(0)
    module = layers.Upsample(8)
    x = torch.randn(2, 8, 5, 5)
    calls = []
    monkeypatch.setattr(layers, "upsample2x_conv3x3", lambda *a: calls.append(1) or upsample2x_conv3x3(*a))
    trained = module(x)
    assert calls == [1] and trained.requires_grad
    with torch.no_grad():
        sampled = module(x)
    assert calls == [1]
    assert torch.equal(sampled, module.conv(F.interpolate(x, scale_factor=2.0, mode="nearest")))
    assert _relative(trained.detach(), sampled) < 1e-5


def test_phase_interleave_backward_passes_gradcheck():
    from vfmtok.tokenizer.utils.fast_conv import _InterleavePhases

    phases = torch.randn(2, 8, 4, 5, dtype=torch.float64, requires_grad=True)  # K = 2, H = 3, W = 4
    assert _InterleavePhases.apply(phases).shape == (2, 2, 6, 8)
    assert torch.autograd.gradcheck(_InterleavePhases.apply, (phases,))
