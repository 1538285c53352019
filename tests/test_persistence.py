"""A saved model folder is complete by itself: tokenizers and denoisers saved with ``save_pretrained`` load back
through diffusers' own pipeline loader (which passes ``low_cpu_mem_usage=True``) with default arguments and give
identical outputs, and a folder with a missing weight still fails loading, naming it."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from vfmtok.generators import DiTModel
from vfmtok.pipelines.config import build_model
from vfmtok.tokenizer import VFMTokModel, load_tokenizer
from vfmtok.tokenizer.utils.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


class ComponentsPipeline(DiffusionPipeline):
    """The smallest pipeline: two registered components, loaded by diffusers' ``load_sub_model``."""

    def __init__(self, vae, transformer):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer)


@pytest.fixture(scope="module")
def components():
    torch.manual_seed(0)
    tokenizer = build_model(ROOT / "configs" / "tokenizer" / "vfmae-tiny.yaml").eval()
    denoiser = build_model(ROOT / "configs" / "flow" / "dit-tiny.yaml").eval()
    denoiser.set_latent_statistics(torch.randn(denoiser.latent_shape), torch.rand(denoiser.latent_shape) + 0.5)
    return tokenizer, denoiser


def outputs(tokenizer, denoiser):
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, tokenizer.input_size, tokenizer.input_size, generator=g) * 2 - 1
    latents = tokenizer.encode(images)
    x = torch.randn(2, *denoiser.latent_shape, generator=g)
    with torch.no_grad():
        velocity = denoiser(x, torch.tensor([0.3, 0.7]), torch.tensor([1, 2]))
    return latents, tokenizer.decode(latents), velocity, denoiser.denormalize_latents(x)


def test_components_load_through_the_diffusers_pipeline_loader(components, tmp_path):
    tokenizer, denoiser = components
    ComponentsPipeline(vae=tokenizer, transformer=denoiser).save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "vae" / "vfm.safetensors").is_file()  # the random VFM travels with the tokenizer
    loaded = ComponentsPipeline.from_pretrained(tmp_path / "pipe")  # diffusers' defaults: low_cpu_mem_usage=True
    assert isinstance(loaded.vae, VFMTokModel) and isinstance(loaded.transformer, DiTModel)
    for name, module in (("vae", loaded.vae), ("transformer", loaded.transformer)):
        on_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert on_meta == [], (name, on_meta)
    assert not any(t.is_meta for t in loaded.vae.vfm.model.state_dict().values())
    for ours, theirs in zip(outputs(tokenizer, denoiser), outputs(loaded.vae.eval(), loaded.transformer.eval())):
        assert torch.equal(ours, theirs)


def test_a_missing_weight_in_a_saved_pipeline_fails_loading_naming_it(components, tmp_path):
    tokenizer, denoiser = components
    ComponentsPipeline(vae=tokenizer, transformer=denoiser).save_pretrained(tmp_path / "pipe")
    weights = tmp_path / "pipe" / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    del state["latent_std"], state["final_layer.linear.weight"]
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"(?s)latent_std.*final_layer\.linear\.weight|final_layer.*latent_std"):
        ComponentsPipeline.from_pretrained(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match=r"final_layer\.linear\.weight"):  # the component loaded alone too
        DiTModel.from_pretrained(tmp_path / "pipe" / "transformer", low_cpu_mem_usage=True)


@pytest.mark.parametrize("file,key", [("diffusion_pytorch_model.safetensors", "encoder.queries"),
                                      ("vfm.safetensors", "layernorm.weight")])
def test_a_missing_tokenizer_or_vfm_weight_fails_loading_naming_it(components, tmp_path, file, key):
    tokenizer, _ = components
    tokenizer.save_pretrained(tmp_path / "tok")
    state = load_file(tmp_path / "tok" / file)
    del state[key]
    save_file(state, tmp_path / "tok" / file)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        VFMTokModel.from_pretrained(tmp_path / "tok", low_cpu_mem_usage=True)


def test_load_tokenizer_dispatches_on_the_class_in_config_json(components, tmp_path):
    tokenizer, _ = components
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert type(loaded) is VFMTokModel and loaded.latent_shape == tokenizer.latent_shape
    config = (tmp_path / "tok" / "config.json")
    config.write_text(config.read_text().replace('"VFMTokModel"', '"NoSuchTokenizer"'))
    with pytest.raises(ValueError, match="NoSuchTokenizer"):
        load_tokenizer(str(tmp_path / "tok"))
