"""`vfmtok demo`: the Gradio page of a pipeline. Same images as ``pipe(...)``, the pipeline's own errors in the page,
a server that keeps serving, nothing fetched from the internet.

The fast tests call the page's function and its HTTP API (gradio_client) on a tiny pipeline. The browser test
(``-m browser``, opt-in: see README "A web demo" for its cost) starts ``python -m vfmtok demo`` and drives the page in
Debian's headless chromium through Selenium; ``VFMTOK_DEMO_SCREENSHOT=docs/demo.png`` also saves the README's
screenshot."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

from vfmtok.pipelines import VFMTokARPipeline, load_pipeline
from vfmtok.pipelines.config import build_model
from vfmtok.pipelines.demo import class_choices, class_id_of, sample_for_demo
from vfmtok.tokenizer.utils.errors import InvalidValueError

ROOT = Path(__file__).resolve().parents[1]


def _config(kind: str, name: str) -> Path:
    return ROOT / "configs" / kind / f"{name}.yaml"


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _gradio():
    """Gradio, or a skip where it is not installed (CI installs the demo extra: there a missing one fails)."""
    if os.environ.get("CI"):
        import gradio
        return gradio
    return pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def flow_pipe():
    from test_pipelines import tiny_flow_pipeline

    return tiny_flow_pipeline(evaluation={"protocol": "tiny test", "gFID (cfg-1.5)": 123.4})


@pytest.fixture(scope="module")
def ar_pipe():
    torch.manual_seed(0)
    return VFMTokARPipeline(build_model(_config("tokenizer", "vfmtok-tiny")).eval(),
                            build_model(_config("ar", "gpt-tiny")).eval())


@pytest.fixture(scope="module")
def flow_dir(flow_pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "pipe"
    flow_pipe.save_pretrained(path)
    return path


def _uint8(images) -> np.ndarray:
    """PIL images -> one uint8 array (what a PNG of them holds)."""
    return np.stack([np.asarray(image.convert("RGB")) for image in images])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the page's function, without Gradio ---------------------------------------------------------------------------
def test_the_demo_samples_what_pipe_returns(flow_pipe, ar_pipe):
    pairs = sample_for_demo(flow_pipe, "golden retriever (207)", 1.5, 3, 2,
                            {"num_inference_steps": 4, "sampler": "sde"})
    expected = flow_pipe(207, guidance_scale=1.5, num_images_per_class=2, generator=_seeded(3),
                         num_inference_steps=4, sampler="sde").images
    assert np.array_equal(_uint8(p[0] for p in pairs), _uint8(expected))
    assert pairs[1][1] == "golden retriever (207) | seed 3 #2 | guidance 1.5 | num inference steps 4, sampler sde"
    pairs = sample_for_demo(ar_pipe, "otter", None, 7, 1, {"temperature": 0.8, "top_k": 20, "top_p": 0.95,
                                                          "guidance_schedule": "linear"})
    expected = ar_pipe(360, num_images_per_class=1, generator=_seeded(7), temperature=0.8, top_k=20, top_p=0.95,
                       guidance_schedule="linear").images
    assert np.array_equal(_uint8(p[0] for p in pairs), _uint8(expected))


def test_classes_are_chosen_by_name_or_id(ar_pipe):
    choices = class_choices(ar_pipe)
    assert len(choices) == 1000 and choices[207] == "golden retriever (207)"
    assert [class_id_of(ar_pipe, text) for text in ("golden retriever (207)", "207", " Golden Retriever ")] == [207] * 3
    unnamed = VFMTokARPipeline(ar_pipe.vqvae, ar_pipe.transformer, id2label={})
    assert class_choices(unnamed)[:3] == ["0", "1", "2"] and class_id_of(unnamed, "12") == 12


@pytest.mark.parametrize("args,match", [
    (("golden retreiver", 1.0, 0, 1), r"unknown class name 'golden retreiver'; did you mean 'golden retriever'"),
    (("", 1.0, 0, 1), "choose a class"),
    (("1000", 1.0, 0, 1), r"outside \[0, 1000\)"),
    (("otter", -1.0, 0, 1), r"guidance_scale must be a finite number >= 0"),
    (("otter", 1.0, 0.5, 1), "the seed must be a whole number"),
    (("otter", 1.0, float("nan"), 1), "the seed must be a whole number"),
    (("otter", 1.0, 0, 17), r"the number of images must be in \[1, 16\] \(this server's limit\), got 17"),
    (("otter", 1.0, 0, 0), r"must be in \[1, 16\]"),
])
def test_bad_input_is_the_pipelines_one_line_error(ar_pipe, args, match):
    with pytest.raises(InvalidValueError, match=match):
        sample_for_demo(ar_pipe, *args, {})


def test_without_gradio_the_demo_says_how_to_install_it(flow_dir, monkeypatch, capsys):
    from vfmtok.pipelines.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # what an install without the extra imports
    assert main(["demo", "--pipeline", str(flow_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'vfmtok demo: error: the demo needs Gradio, an optional extra: pip install "vfmtok[demo]" (in a ' \
                  'checkout: pip install -e ".[demo]")'


def test_a_saved_pipeline_folder_carries_an_app_for_a_space(flow_pipe, flow_dir):
    import ast
    import runpy

    app = flow_dir / "app.py"
    imports = [node for node in ast.walk(ast.parse(app.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert {node.module for node in imports} == {"pathlib", "vfmtok.pipelines.demo", "vfmtok.pipelines.pipeline_common"}
    assert "vfmtok demo --pipeline" in (flow_dir / "README.md").read_text()
    _gradio()
    demo = runpy.run_path(str(app))["demo"]  # built, not launched (run_name is not __main__)
    functions = [f for f in demo.fns.values() if f.api_name == "generate"]
    assert len(functions) == 1
    pairs = functions[0].fn("otter (360)", 2.0, 1, 1, 3, "sde")
    expected = flow_pipe(360, guidance_scale=2.0, generator=_seeded(1), num_inference_steps=3, sampler="sde").images
    assert np.array_equal(_uint8(p[0] for p in pairs), _uint8(expected))


def test_vfmtok_demo_serves_the_folder_locally_without_ssr_or_sharing(flow_dir, monkeypatch):
    gr = _gradio()
    from vfmtok.pipelines.cli import main

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, blocks=self))
    assert main(["demo", "--pipeline", str(flow_dir), "--port", "0", "--device", "cpu", "--max-images", "3"]) == 0
    assert {k: launched[k] for k in ("server_name", "server_port", "share", "ssr_mode")} == {
        "server_name": "127.0.0.1", "server_port": 0, "share": False, "ssr_mode": False}
    assert launched["blocks"].title == "vfmtok: VFMTokFlowPipeline"
    assert launched["blocks"].analytics_enabled is False


# -- the page's HTTP API (gradio_client) ---------------------------------------------------------------------------
def test_the_served_page_gives_pipe_images_and_errors_and_keeps_serving(flow_pipe):
    _gradio()
    from gradio_client import Client

    from vfmtok.pipelines.demo import build_demo

    demo = build_demo(flow_pipe, max_images=4)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        good = ("golden retriever (207)", 1.5, 3, 2, 4, "scheduler")
        result = client.predict(*good, api_name="/generate")
        expected = flow_pipe(207, guidance_scale=1.5, num_images_per_class=2, generator=_seeded(3),
                             num_inference_steps=4, sampler="scheduler").images
        assert np.array_equal(_uint8(Image.open(r["image"]) for r in result), _uint8(expected))  # PNG: lossless
        assert [r["caption"] for r in result] == [
            f"golden retriever (207) | seed 3 #{k} | guidance 1.5 | num inference steps 4, sampler scheduler"
            for k in (1, 2)]
        for bad, message in [(("golden retreiver", 1.5, 3, 2, 4, "scheduler"), "did you mean 'golden retriever'"),
                             (("otter", -2.0, 3, 2, 4, "scheduler"), "guidance_scale must be a finite number >= 0"),
                             (("otter", 1.0, 3, 1000, 4, "scheduler"), "the number of images must be in [1, 4]")]:
            with pytest.raises(Exception) as error:
                client.predict(*bad, api_name="/generate")
            assert message in str(error.value) and "Traceback" not in str(error.value)
        again = client.predict(*good, api_name="/generate")  # still serving, still the same images
        assert np.array_equal(_uint8(Image.open(r["image"]) for r in again), _uint8(expected))
        config = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=30).read())
        card = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "model-card"]
        assert "| gFID (cfg-1.5) | 123.4 |" in card[0]["props"]["value"]  # the model card's evaluation table
    finally:
        demo.close()


# -- the real page in a real browser -------------------------------------------------------------------------------
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _browser():
    """Debian's headless chromium through its chromedriver (Selenium Manager, which downloads drivers, is not used),
    recording every network request."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _requested_hosts(driver) -> set[str]:
    hosts = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = urlparse(message["params"]["request"]["url"])
            if url.scheme in ("http", "https", "ws", "wss"):
                hosts.add(url.hostname)
    return hosts


def _start_demo(folder: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vfmtok", "demo", "--pipeline", str(folder), "--port", str(port),
                               "--device", "cpu", "--max-images", "8"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vfmtok demo exited with {server.returncode}: {server.stdout.read()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise AssertionError("vfmtok demo did not answer within 180 s")


@pytest.mark.browser
def test_the_page_in_a_browser_picks_a_class_by_name_and_shows_pipe_images_offline(flow_pipe, flow_dir):
    _gradio()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    server = _start_demo(flow_dir, port)
    driver = _browser()
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{port}/")
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#class input")))
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("ott")  # search by name, then pick the entry (the page starts at golden retriever)
        option = wait.until(ec.element_to_be_clickable(
            (By.CSS_SELECTOR, "li[data-testid='dropdown-option'][aria-label='otter (360)']")))
        option.click()
        for elem_id, value in (("seed", "3"), ("count", "2")):
            field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input")
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(value)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) >= 2)
        sources = [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#gallery img")][:2]
        shown = [Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=30).read())) for src in sources]
        expected = flow_pipe(360, guidance_scale=1.0, num_images_per_class=2, generator=_seeded(3),
                             num_inference_steps=50, sampler="scheduler").images
        assert np.array_equal(_uint8(shown), _uint8(expected))
        assert "otter (360) | seed 3 #1" in driver.find_element(By.CSS_SELECTOR, "#gallery").text
        screenshot = os.environ.get("VFMTOK_DEMO_SCREENSHOT")
        if screenshot:
            driver.save_screenshot(screenshot)

        box = driver.find_element(By.CSS_SELECTOR, "#class input")
        box.click()
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys("golden retreiver", Keys.ENTER)  # not a class: the pipeline's message, in the page
        driver.find_element(By.CSS_SELECTOR, "#model-card").click()  # leave the box: its value is committed
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "did you mean 'golden retriever'" in d.find_element(By.TAG_NAME, "body").text)
        body = driver.find_element(By.TAG_NAME, "body").text
        assert "unknown class name 'golden retreiver'" in body and "Traceback" not in body
        assert _requested_hosts(driver) == {"127.0.0.1"}  # fonts, scripts, analytics: nothing from outside
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)
