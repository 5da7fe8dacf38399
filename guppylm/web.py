"""Guppy in the browser: build the page's bundle and serve it from 127.0.0.1.

space/web/ holds the page (index.html, guppy.js, demo.json) and the npm manifest of its runtime. Serving it:
  1. the port is taken first, so a busy one fails before anything slow
  2. `npm ci` installs the runtime into space/web/node_modules (once; from the registry lockfile, no install scripts)
     and the few files the page imports are copied into space/web/vendor/
  3. the model is exported (guppylm.export) into a folder the server mounts at /model/, with page.json: what the
     page needs from Python (context, cache shape, the sampling limits of guppylm.inference)
  4. the server answers only the files of an explicit list - no listings, no dotfiles, nothing a symlink leads
     out of its folder to - on a bounded pool of threads.
Every byte the page loads, wasm included, then comes from this server: no CDN, no Hub.
"""

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

WEB_DIR = Path(__file__).resolve().parents[1] / "space" / "web"  # guppylm/web.py -> the checkout's space/web/
DEFAULT_BUNDLE = WEB_DIR / "model"
PAGE_FILES = ("index.html", "guppy.js", "demo.json")
PAGE_INFO = "page.json"  # written into the bundle: what guppy.js needs from Python
REPORT_FILE = "export_report.json"  # guppylm.export.REPORT_FILE, named here so a busy port fails before torch loads
MODEL_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", REPORT_FILE, PAGE_INFO)
THREADS = 8  # requests answered at once; more wait for a free thread
REQUEST_TIMEOUT = 10  # seconds a connection may stay silent before it is closed

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
WASM = WEB_DIR / "vendor" / "ort-wasm-simd-threaded.wasm"
# CI and offline machines: the npm registry is reachable, nothing else; install scripts would download binaries
NPM_CI = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming refuses anything else
    ".mjs": "text/javascript",  # module scripts are refused under a non-JavaScript type
    ".js": "text/javascript",
    ".json": "application/json",
    ".onnx": "application/octet-stream",
}


def install_runtime():
    """npm ci the page's runtime if node_modules lacks it, then copy the files the page imports into vendor/."""
    if not (WEB_DIR / "package.json").is_file():
        raise FileNotFoundError(f"no page at {WEB_DIR}: `guppylm serve-web` runs from a GuppyLM source checkout")
    modules = WEB_DIR / "node_modules"
    if not all((modules / source).is_file() for source in VENDOR_FILES):
        if shutil.which("npm") is None:
            raise RuntimeError("npm not found: install Node.js 20+ to build the browser page")
        env = {**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}  # never fetch onnxruntime-node's binaries
        done = subprocess.run(NPM_CI, cwd=WEB_DIR, env=env, capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise RuntimeError(f"npm ci in {WEB_DIR} failed: {reason}")
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


def write_page_info(model_dir, bundle_dir):
    """page.json: the numbers guppy.js takes from Python rather than from a copy - the context, the KV cache's
    shape, the size of the wasm runtime (for the progress bar) and the sampling limits of guppylm.inference."""
    from guppylm import GuppyConfig
    from guppylm.inference import LIMITS

    config = GuppyConfig.from_pretrained(model_dir)
    info = {
        "context": config.max_position_embeddings,
        "heads": config.num_attention_heads,
        "head_dim": config.hidden_size // config.num_attention_heads,
        "wasm_bytes": WASM.stat().st_size,
        "limits": LIMITS,
    }
    (Path(bundle_dir) / PAGE_INFO).write_text(json.dumps(info, indent=2) + "\n")


def build_bundle(model_dir, bundle_dir=DEFAULT_BUNDLE, force=False):
    """Runtime into vendor/, model into `bundle_dir` (fp32 + int8, verified), page.json beside it.

    Returns the export report (the fresh one, or the one already there).
    """
    from guppylm.export import export_onnx

    install_runtime()
    if force or not is_fresh(model_dir, bundle_dir):
        export_onnx(Path(model_dir).resolve(), bundle_dir, quantize_int8=True, overwrite=True)  # the bundle is ours to refresh
    write_page_info(model_dir, bundle_dir)
    return json.loads((Path(bundle_dir) / REPORT_FILE).read_text())


def routes(bundle_dir):
    """{URL path: file} for everything the page loads: the page, the runtime in vendor/, the export under /model/.

    A name is served only if it is in this list; a file that is a symlink out of its folder, or a hidden name
    (a report listing ".env", say), is left out.
    """
    bundle_dir = Path(bundle_dir)
    report = json.loads((bundle_dir / REPORT_FILE).read_text())
    entries = [(WEB_DIR, name, f"/{name}") for name in PAGE_FILES]
    entries += [(WEB_DIR / "vendor", name, f"/vendor/{name}") for name in VENDOR_FILES.values()]
    entries += [(bundle_dir, name, f"/model/{name}") for name in (*MODEL_FILES, *report["files"])]
    table = {"/": WEB_DIR / "index.html"}
    for folder, name, route in entries:
        path = folder / name
        hidden = any(part.startswith(".") for part in Path(name).parts)
        if not hidden and path.is_file() and path.resolve().is_relative_to(folder.resolve()):
            table[route] = path
    return table


class PageHandler(BaseHTTPRequestHandler):
    """GET and HEAD of the server's route table; everything else is 404 (or 501 for other methods)."""

    timeout = REQUEST_TIMEOUT

    def do_GET(self, body=True):
        path = self.server.routes.get(unquote(urlsplit(self.path).path))
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(path.stat().st_size))  # the page's progress bar counts on it
        self.send_header("Cache-Control", "no-store")  # a re-export shows up on reload
        self.end_headers()
        if body:
            with path.open("rb") as file:
                shutil.copyfileobj(file, self.wfile)

    def do_HEAD(self):
        self.do_GET(body=False)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name; requests are not logged
        pass


class PageServer(HTTPServer):
    """An HTTP server that answers on a pool of THREADS threads: a burst of connections waits, it spawns nothing."""

    def __init__(self, address, threads=THREADS):
        self.routes = {}
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="page")
        super().__init__(address, PageHandler)

    def process_request(self, request, client_address):
        self.pool.submit(self._answer, request, client_address)

    def _answer(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except (ConnectionError, TimeoutError):  # the visitor left mid-download, or said nothing for too long
            pass
        except Exception:  # noqa: BLE001 - one failed request must not stop the server
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def server_close(self):
        super().server_close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def make_server(port=0):
    """A server bound to 127.0.0.1:`port` (0: any free one), with no routes yet; a busy port is one clear OSError."""
    try:
        return PageServer(("127.0.0.1", port))
    except OSError as error:
        if error.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise OSError(f"port {port} on 127.0.0.1 is in use; pass --port with a free one") from None
        raise OSError(f"cannot listen on 127.0.0.1:{port}: {error.strerror}") from None


def describe_sizes(report):
    """One line: what a visitor downloads."""
    runtime = sum((WEB_DIR / "vendor" / name).stat().st_size for name in VENDOR_FILES.values())
    graphs = ", ".join(f"{name} {check['bytes'] / 1e6:.1f} MB" for name, check in report["files"].items())
    return f"a visitor downloads the runtime once ({runtime / 1e6:.1f} MB) and one model ({graphs})"


def serve_web(model_dir=None, port=8000, bundle_dir=None, force=False):
    """`guppylm serve-web`: take the port, build the bundle, then serve it until interrupted."""
    from guppylm.folders import default_model

    model_dir, bundle_dir = model_dir or default_model(), bundle_dir or DEFAULT_BUNDLE
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no model at {model_dir!r}: train one with `guppylm train` (or `make demo`)")
    with make_server(port) as server:
        report = build_bundle(model_dir, bundle_dir, force=force)
        server.routes = routes(bundle_dir)
        print(describe_sizes(report))
        print(f"guppy is swimming at http://127.0.0.1:{server.server_address[1]}/  (ctrl-c to stop)", flush=True)
        server.serve_forever()
