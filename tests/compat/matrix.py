"""`make compat`: a saved Guppy folder under every transformers version it supports, each in a clean environment.

    python tests/compat/matrix.py              # guppylm.card.TESTED_TRANSFORMERS and the version `make setup` installed
    python tests/compat/matrix.py 5.10.4       # any versions, named

1. In this environment (guppylm installed): save a small trained model and record its greedy replies and logits.
2. Per version: a virtual environment with torch, that transformers and pytest, and nothing of guppylm, made once
   with uv and kept under ~/.cache/guppylm/compat (uv's cache shares the torch files between them).
3. There, the TESTS modules run: test_saved_folder.py loads the folder through the Auto classes with the folder's own
   code and checks replies, logits, the cache, padding, pipeline, attentions and gradient checkpointing against step 1;
   test_gpt2_twin.py loads its GPT-2 twin with no remote code at all.

`venv()` is the one way this directory makes an environment; tests/compat/lowest.py uses it too.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "guppylm", "compat")
UV = [sys.executable, "-m", "uv"]
TESTS = [HERE / "test_saved_folder.py", HERE / "test_gpt2_twin.py"]  # run, in one pytest, under each version against the folder of step 1
PROMPTS = ["hi", "is the water warm?", "what is food?", "who feeds you?"]
MAX_NEW_TOKENS = 24

# Versions that do not install as plain `transformers==V`. 5.25.0 declares kernels>=0.19.1, which PyPI does not
# serve yet: it goes in on the dependencies of 5.24.0, and then `from_pretrained` of any model (stock GPT-2 too)
# needs USE_HUB_KERNELS=0.
SPECIAL = {"5.25.0": {"dependencies_of": "5.24.0", "env": {"USE_HUB_KERNELS": "0"}}}


def build_reference(folder):
    """Save the test suite's small trained model to `folder`/model; write the replies and logits it gives here."""
    sys.path.insert(0, str(HERE.parent))
    from conftest import make_parrot_model

    model, tokenizer = make_parrot_model(folder / "model")
    from guppylm.export_gpt2 import export_gpt2

    export_gpt2(folder / "model", folder / "gpt2")  # its GPT-2 twin: test_gpt2_twin.py
    messages = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    replies, last_logits = [], []
    with torch.no_grad():
        for message in messages:
            inputs = tokenizer.apply_chat_template(message, add_generation_prompt=True, return_dict=True, return_tensors="pt")
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, use_cache=False)
            replies.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
            last_logits.append(model(**inputs).logits[0, -1].tolist())
    expected = dict(prompts=PROMPTS, max_new_tokens=MAX_NEW_TOKENS, replies=replies, last_logits=last_logits,
                    reference=f"transformers {transformers.__version__}")
    (folder / "expected.json").write_text(json.dumps(expected))


def torch_wheel():
    """The wheel of the torch installed here, fetched by this environment's pip (which knows the local wheel cache)."""
    wheels = CACHE / "wheels"
    version = torch.__version__
    found = sorted(wheels.glob(f"torch-{version.replace('+', '*')}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", f"torch=={version}", "-d", str(wheels)],
            check=True,
        )
        found = sorted(wheels.glob("torch-*.whl"))
    return found[-1]


def venv(name, *installs):
    """A cached virtual environment CACHE/…-`name` with the torch installed here, then each list of `uv pip install`
    arguments in turn; its python. Made once (uv's cache shares the files between environments); a half-made one
    is made again."""
    folder = CACHE / f"py{sys.version_info.major}.{sys.version_info.minor}-torch{torch.__version__}-{name}"
    python = folder / "bin" / "python"
    if (folder / ".complete").is_file():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([*UV, "venv", "-q", "--python", sys.executable, str(folder)], check=True)
    first, *rest = installs
    for arguments in ([str(torch_wheel()), *first], *rest):  # the wheel, a direct requirement, keeps this torch
        subprocess.run([*UV, "pip", "install", "-q", "--python", str(python), *arguments], check=True)
    (folder / ".complete").touch()
    return python


def environment(version):
    """Torch, transformers==`version` and pytest, without guppylm; its python."""
    base = SPECIAL.get(version, {}).get("dependencies_of", version)
    installs = [[f"transformers=={base}", "pytest", "pytest-timeout"]]
    if base != version:
        installs.append(["--no-deps", f"transformers=={version}"])
    return venv(f"transformers{version}", *installs)


def run(version, folder):
    """Run the TESTS modules under `version`; (passed, seconds, output)."""
    python = environment(version)
    env = {**os.environ, **SPECIAL.get(version, {}).get("env", {}), "GUPPYLM_COMPAT_DIR": str(folder), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    result = subprocess.run(
        [str(python), "-m", "pytest", *map(str, TESTS), "-q", "-p", "no:cacheprovider",
         f"--rootdir={HERE}", f"--confcutdir={HERE}", "-o", "addopts=", "--timeout=300"],
        cwd=folder, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # cwd is the temporary folder: the checkout (and so guppylm) is not on the path there
    return result.returncode == 0, time.perf_counter() - started, result.stdout + result.stderr


def main(versions):
    from guppylm.card import TESTED_TRANSFORMERS  # the list the model card states

    versions = versions or sorted({*TESTED_TRANSFORMERS, transformers.__version__}, key=lambda v: tuple(map(int, v.split("."))))
    failed = []
    with tempfile.TemporaryDirectory(prefix="guppylm-compat-") as tmp:
        folder = Path(tmp)
        build_reference(folder)
        print(f"reference: transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
        for version in versions:
            passed, seconds, output = run(version, folder)
            summary = output.strip().splitlines()[-1] if output.strip() else "no output"
            print(f"transformers {version:8s} {'ok  ' if passed else 'FAIL'} {summary} ({seconds:.0f} s)", flush=True)
            if not passed:
                print(output[-6000:], flush=True)
                failed.append(version)
    if failed:
        sys.exit(f"the saved folder fails under transformers {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
