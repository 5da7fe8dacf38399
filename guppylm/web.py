"""Guppy in the browser: build the page's bundle and serve it from 127.0.0.1.

space/web/ holds the page (index.html, guppy.js) and the npm manifest of its runtime. Building the bundle:
  1. `npm ci` installs the runtime into space/web/node_modules (once; from the registry lockfile, no install scripts)
  2. the few files the page imports are copied into space/web/vendor/
  3. the model is exported (guppylm.export) into a folder the server mounts at /model/
Every byte the page loads, wasm included, then comes from this server: no CDN, no Hub.
"""

import functools
import json
import os
import shutil
import subprocess
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from guppylm.export import REPORT_FILE, describe, export_onnx

WEB_DIR = Path(__file__).resolve().parents[1] / "space" / "web"  # guppylm/web.py -> the checkout's space/web/
DEFAULT_BUNDLE = WEB_DIR / "model"
MODEL_ROUTE = "/model/"

# node_modules path -> name in vendor/. ONNX Runtime Web's wasm-only build runs the graph (it loads its
# .mjs/.wasm pair from beside itself); tokenizers.js and jinja are the libraries transformers.js 4 uses to
# tokenize and to render chat templates.
VENDOR_FILES = {
    "onnxruntime-web/dist/ort.wasm.min.mjs": "ort.wasm.min.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.mjs": "ort-wasm-simd-threaded.mjs",
    "onnxruntime-web/dist/ort-wasm-simd-threaded.wasm": "ort-wasm-simd-threaded.wasm",
    "@huggingface/tokenizers/dist/tokenizers.min.mjs": "tokenizers.min.mjs",
    "@huggingface/jinja/dist/index.js": "jinja.mjs",
}
# CI and offline machines: the npm registry is reachable, nothing else; install scripts would download binaries
NPM_CI = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"]


def install_runtime():
    """npm ci the page's runtime if node_modules lacks it, then copy the files the page imports into vendor/."""
    if not (WEB_DIR / "package.json").is_file():
        raise FileNotFoundError(f"no page at {WEB_DIR}: `guppylm serve-web` runs from a GuppyLM source checkout")
    modules = WEB_DIR / "node_modules"
    if not all((modules / source).is_file() for source in VENDOR_FILES):
        if shutil.which("npm") is None:
            raise RuntimeError("npm not found: install Node.js 20+ to build the browser page")
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}  # never fetch onnxruntime-node's binaries
        subprocess.run(NPM_CI, cwd=WEB_DIR, env=env, check=True, stdout=subprocess.DEVNULL)
    vendor = WEB_DIR / "vendor"
    vendor.mkdir(exist_ok=True)
    for source, name in VENDOR_FILES.items():
        shutil.copyfile(modules / source, vendor / name)


def is_fresh(model_dir, bundle_dir):
    """Whether `bundle_dir` holds a verified export of `model_dir` that is newer than its weights."""
    report, weights = Path(bundle_dir) / REPORT_FILE, Path(model_dir) / "model.safetensors"
    if not (report.is_file() and weights.is_file()) or report.stat().st_mtime < weights.stat().st_mtime:
        return False
    report = json.loads(report.read_text())
    return report.get("verified") is True and report.get("source") == str(Path(model_dir).resolve())


def build_bundle(model_dir, bundle_dir=DEFAULT_BUNDLE, force=False):
    """Runtime into vendor/, model into `bundle_dir` (fp32 + int8, verified).

    Returns the export report, or None when `bundle_dir` already holds a fresh export of this model.
    """
    install_runtime()
    if force or not is_fresh(model_dir, bundle_dir):
        return export_onnx(Path(model_dir).resolve(), bundle_dir, quantize_int8=True, overwrite=True)
    return None


class PageHandler(SimpleHTTPRequestHandler):
    """Static files from the page folder, the exported model under /model/, MIME types browsers insist on."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming refuses anything else
        ".mjs": "text/javascript",  # module scripts are refused under a non-JavaScript type
        ".js": "text/javascript",
        ".json": "application/json",
        ".onnx": "application/octet-stream",
    }

    def __init__(self, *args, bundle_dir, **kwargs):
        self.bundle_dir = Path(bundle_dir)
        super().__init__(*args, **kwargs)

    def translate_path(self, path):
        route = unquote(urlsplit(path).path)
        if route.startswith(MODEL_ROUTE):
            parts = route[len(MODEL_ROUTE) :].split("/")
            # the bundle's files, and those of its onnx/ folder: "..", "" or anything deeper never leaves it (404)
            inside = parts[-1] not in ("", ".", "..") and (len(parts) == 1 or (len(parts) == 2 and parts[0] == "onnx"))
            return str(self.bundle_dir.joinpath(*parts)) if inside else ""
        return super().translate_path(path)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")  # a re-export shows up on reload
        super().end_headers()


def make_server(bundle_dir, port=0):
    """A server on 127.0.0.1 (port 0: any free one) for the page in space/web/ and the model in `bundle_dir`."""
    handler = functools.partial(PageHandler, directory=str(WEB_DIR), bundle_dir=bundle_dir)
    return ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve_web(model_dir=None, port=8000, bundle_dir=None, force=False):
    """`guppylm serve-web`: build the bundle, then serve it until interrupted."""
    from guppylm.folders import default_model

    model_dir, bundle_dir = model_dir or default_model(), bundle_dir or DEFAULT_BUNDLE
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no model at {model_dir!r}: train one with `guppylm train` (or `make demo`)")
    report = build_bundle(model_dir, bundle_dir, force=force)
    print(describe(report) if report else f"serving the export already in {bundle_dir} (--force exports again)")
    with make_server(bundle_dir, port) as server:
        print(f"guppy is swimming at http://127.0.0.1:{server.server_address[1]}/  (ctrl-c to stop)", flush=True)
        server.serve_forever()
