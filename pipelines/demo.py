"""`vfmtok demo`: a web page (Gradio) to sample a saved pipeline, the way released models are met on the Hub.

:func:`build_demo` makes the page for a loaded pipeline: the class chosen by name (a searchable dropdown of its
``id2label``, ids too), the guidance scale, the generator's own settings (steps and sampler for flow; temperature,
top-k, top-p and guidance schedule for AR), the seed and the number of images; a gallery of the results captioned
with their class and settings, a progress bar, and the pipeline's model card beside it. The images are exactly
``pipe(class_id, num_images_per_class=n, generator=torch.Generator(pipe.device).manual_seed(seed), ...)``.

Bad input (an unknown class, a scale or setting the pipeline refuses, too many images) is shown in the page as the
pipeline's own one-line message; the server keeps serving. Requests queue and run one at a time. Nothing
is fetched from the internet at run time: Gradio's analytics are off, its default theme's fonts are served locally
and server-side rendering (a Node.js process) is off.

Gradio is an optional dependency (``pip install "vfmtok[demo]"``); without it, the page's functions raise
:class:`MissingDependencyError` with that command.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

from vfmtok.tokenizer.utils.errors import InvalidValueError, MissingDependencyError, VFMTokError

__all__ = ["build_demo", "serve_demo", "sample_for_demo", "class_choices", "class_id_of"]

INSTALL_HINT = 'pip install "vfmtok[demo]" (in a checkout: pip install -e ".[demo]")'
# What one request may ask for unless the server says otherwise (`vfmtok demo --max-images`).
DEFAULT_MAX_IMAGES = 16
DEFAULT_MAX_QUEUE = 64


def _import_gradio() -> Any:
    # Gradio reads the variable when it is imported: no usage statistics or version check leave the machine.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise MissingDependencyError(f"the demo needs Gradio, an optional extra: {INSTALL_HINT}") from error
    return gradio


def class_choices(pipe: Any) -> list[str]:
    """The dropdown's entries: ``"name (id)"`` for every named class, else the ids."""
    names = pipe.id2label
    return [f"{names[i]} ({i})" if i in names else str(i) for i in range(pipe.num_classes)]


def class_id_of(pipe: Any, text: Any) -> int:
    """A dropdown entry, a class id or a class name (the pipeline's own lookup and its errors) -> the class id."""
    if text is None or not str(text).strip():
        raise InvalidValueError("choose a class: type a class name or id")
    text = str(text).strip()
    if text.isdigit():
        return pipe.resolve_class_labels(int(text))[0]
    if text.endswith(")") and "(" in text:  # "name (id)" as the dropdown lists it
        name, _, number = text[:-1].rpartition("(")
        if number.strip().isdigit() and pipe.id2label.get(int(number)) == name.strip():
            return int(number)
    return pipe.get_label_ids(text)[0]


def _whole_number(value: Any, what: str) -> int:
    """Gradio's Number gives floats: a whole number as int, else the one-line error."""
    if (value is None or isinstance(value, bool) or not math.isfinite(float(value))
            or float(value) != int(float(value))):
        raise InvalidValueError(f"{what} must be a whole number, got {value!r}")
    return int(float(value))


def _is_flow(pipe: Any) -> bool:
    return hasattr(pipe, "scheduler")


def sample_for_demo(pipe: Any, class_text: Any, guidance_scale: Optional[float], seed: Any, num_images: Any,
                    settings: dict[str, Any], max_images: int = DEFAULT_MAX_IMAGES) -> list[tuple[Any, str]]:
    """What the page's Generate button does, without Gradio: ``(PIL image, caption)`` pairs, exactly the images of
    ``pipe(class_id, guidance_scale=..., num_images_per_class=num_images, generator=torch.Generator(pipe.device)
    .manual_seed(seed), **settings)``. Bad input raises the pipeline's :class:`VFMTokError`."""
    import torch

    class_id = class_id_of(pipe, class_text)
    seed = _whole_number(seed, "the seed")
    if not 0 <= seed < 2 ** 63:
        raise InvalidValueError(f"the seed must be in [0, 2**63), got {seed}")
    count = _whole_number(num_images, "the number of images")
    if not 1 <= count <= max_images:
        raise InvalidValueError(f"the number of images must be in [1, {max_images}] (this server's limit), got "
                                f"{count}")
    settings = {k: v for k, v in settings.items() if v is not None}
    pipe.check_sampler_options(settings)
    scale = pipe.resolve_guidance_scale(guidance_scale)
    images = pipe(class_id, guidance_scale=scale, num_images_per_class=count,
                  generator=torch.Generator(pipe.device).manual_seed(seed), output_type="pil", **settings).images
    name = pipe.id2label.get(class_id, f"class {class_id}")
    described = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())
    return [(image, f"{name} ({class_id}) | seed {seed} #{k + 1} | guidance {scale:g}"
                    + (f" | {described}" if described else ""))
            for k, image in enumerate(images)]


def _settings_inputs(gr: Any, pipe: Any) -> tuple[list[Any], list[str]]:
    """The generator's own settings as page inputs, and the ``pipe(...)`` keyword each one sets."""
    if _is_flow(pipe):
        from vfmtok.pipelines.pipeline_vfmtok_flow import SAMPLERS

        default = pipe.sampling_protocol  # the sampler and steps pipe(...) uses when given none
        return [gr.Slider(1, 250, value=default["num_inference_steps"], step=1, label="Steps",
                          info="num_inference_steps"),
                gr.Dropdown(list(SAMPLERS), value=default["sampler"], label="Sampler",
                            info=f"scheduler: {type(pipe.scheduler).__name__}; sde: Euler-Maruyama; the others: "
                                 f"flow solvers with the pipeline's time shift")], \
            ["num_inference_steps", "sampler"]
    from vfmtok.generators.gpt import GUIDANCE_SCHEDULES

    return [gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature"),
            gr.Number(value=0, precision=0, label="Top-k", info="0 = all codes"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", info="1 = all codes"),
            # "interval" needs a number of guided tokens, which the page does not ask for
            gr.Dropdown([s for s in GUIDANCE_SCHEDULES if s != "interval"], value="constant", label="Guidance schedule",
                        info="how the guidance scale varies over the tokens")], \
        ["temperature", "top_k", "top_p", "guidance_schedule"]


def build_demo(pipe: Any, max_images: int = DEFAULT_MAX_IMAGES, max_queue: int = DEFAULT_MAX_QUEUE) -> Any:
    """The page (a ``gradio.Blocks``) for a loaded pipeline; call ``.launch()`` on it. See the module's docstring.

    Requests queue and are sampled one at a time: a flow pipeline is not safe to call from two threads at once (its
    scheduler's timesteps are state of the pipeline), and one call already uses every core or the GPU. Beyond ``max_queue`` waiting requests, Gradio refuses new ones with a message."""
    gr = _import_gradio()
    pipe.set_progress_bar_config(disable=False)  # Gradio's progress bar follows the pipeline's tqdm
    name = type(pipe).__name__
    default_scale = pipe.resolve_guidance_scale(None)
    choices = class_choices(pipe)
    default_class = next((c for c in choices if c.endswith("(207)")), choices[0])
    with gr.Blocks(title=f"vfmtok: {name}", analytics_enabled=False) as demo:
        gr.Markdown(f"# {name}\nClass-conditional samples; the same seed and settings give the same images as "
                    f"`pipe(...)` in Python.")
        with gr.Row():
            with gr.Column(scale=2):
                class_box = gr.Dropdown(choices, value=default_class, label="Class", filterable=True,
                                        allow_custom_value=True, elem_id="class",
                                        info=f"{pipe.num_classes} classes: type to search by name or id")
                scale_box = gr.Number(value=default_scale, label="Guidance scale", elem_id="guidance",
                                      info="1 = no guidance")
                with gr.Accordion("Generator settings", open=True):
                    settings_boxes, settings_names = _settings_inputs(gr, pipe)
                with gr.Row():
                    seed_box = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                    count_box = gr.Number(value=4, precision=0, label="Images", elem_id="count",
                                          info=f"at most {max_images}")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Samples", columns=4, format="png", elem_id="gallery",
                                     object_fit="contain", height="auto")
                with gr.Accordion("Model card", open=True):
                    gr.Markdown(pipe.model_card().text, elem_id="model-card")

        def generate(class_text, guidance_scale, seed, num_images, *settings, progress=gr.Progress(track_tqdm=True)):
            try:
                return sample_for_demo(pipe, class_text, guidance_scale, seed, num_images,
                                       dict(zip(settings_names, settings)), max_images=max_images)
            except VFMTokError as error:  # the pipeline's own one-line message, in the page; no traceback
                raise gr.Error(str(error), duration=None, print_exception=False) from None

        button.click(generate, [class_box, scale_box, seed_box, count_box, *settings_boxes], gallery,
                     api_name="generate", concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=max_queue)
    return demo


def serve_demo(pipeline: str, host: str = "127.0.0.1", port: int = 7860, device: str = "cpu",
               max_images: int = DEFAULT_MAX_IMAGES, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
    """Load ``pipeline`` (a folder or Hub id), move it to ``device`` and serve its page until interrupted."""
    _import_gradio()  # the missing extra is the first error, before the pipeline is loaded
    from vfmtok.pipelines.pipeline_common import load_pipeline

    pipe = load_pipeline(pipeline).to(device)
    build_demo(pipe, max_images=max_images, max_queue=max_queue).launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False, show_error=False)
