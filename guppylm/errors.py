"""Failures a user can act on, as one line: what went wrong with the Hub, never the token."""

import importlib
import sys
from contextlib import contextmanager


class HubError(RuntimeError):
    """A Hub operation failed; the message is one line, safe to print (it never holds the token)."""


def _causes(error):
    """The error and the ones it was raised from, outermost first."""
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _transport_errors():
    """The HTTP client's connection errors: huggingface_hub 2 talks through httpx2, 1.x through httpx."""
    found = []
    for client in ("httpx2", "httpx"):
        try:
            found.append(importlib.import_module(client).TransportError)
        except ImportError:
            pass
    return found


def _explain(error, repo_id, repo_type):
    """One line for a failure anywhere under huggingface_hub / transformers / datasets, or None."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        LocalTokenNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    datasets_errors = sys.modules.get("datasets.exceptions")  # only an imported datasets can have raised
    not_found = (RepositoryNotFoundError, *([datasets_errors.DatasetNotFoundError] if datasets_errors else []))
    network = (*_transport_errors(), ConnectionError, TimeoutError, LocalEntryNotFoundError)  # incl. OfflineModeIsEnabled
    where = f"{repo_type} repository '{repo_id}'"
    for cause in _causes(error):  # outermost first: the first one we recognise is the most specific
        if isinstance(cause, LocalTokenNotFoundError):
            return "no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`"
        if isinstance(cause, RevisionNotFoundError):
            return f"revision not found in {where} on {constants.ENDPOINT}"
        if isinstance(cause, not_found):
            return f"{where} not found on {constants.ENDPOINT} (check the id, and that your token can see it)"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None and cause.response.status_code in (401, 403):
            if cause.response.status_code == 401:
                return f"the Hub at {constants.ENDPOINT} rejected the token (401): check --token, HF_TOKEN or `hf auth login`"
            return f"the token may not write to {where} (403): it needs write access to that namespace"
    for cause in _causes(error):
        if isinstance(cause, network) and constants.HF_HUB_OFFLINE:
            return f"HF_HUB_OFFLINE=1 and {where} is not in the cache ({constants.HF_HUB_CACHE}); go online once to download it"
        if isinstance(cause, network):
            return f"cannot reach the Hub at {constants.ENDPOINT} ({type(cause).__name__}); check the network or use HF_HUB_OFFLINE=1"
    return None


@contextmanager
def hub_errors(repo_id, repo_type="model"):
    """Re-raise Hub failures inside the block as a one-line HubError: wrap `from_pretrained(repo_id)` or
    `load_dataset(repo_id)` in it to get "not found on <endpoint>", "rejected the token", "not in the cache"."""
    try:
        yield
    except HubError:
        raise
    except Exception as error:
        message = _explain(error, repo_id, repo_type)
        if message is None:
            raise
        raise HubError(message) from None  # `from None`: the chained traceback would only repeat the URL
