"""A small Hub-compatible HTTP server for tests: the subset of the Hugging Face Hub API that
huggingface_hub, transformers and datasets call to push and pull models, datasets and Spaces.

Stdlib only; repos live in memory. Clients point at it with HF_ENDPOINT (read at import, so set it
first) and HF_HUB_DISABLE_XET=1, because this server speaks plain git-LFS (batch, then PUT), not Xet.
A route it does not implement answers 501 (a request it cannot parse, 500) and is recorded in
`HubServer.unhandled`, so protocol drift in a client library fails the tests loudly instead of being
papered over.

    server = HubServer(token="hf_test").start()   # in-process, background thread
    python tests/hub_server.py --port 8123 --token hf_test   # standalone
"""

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

REPO_TYPES = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # repo type -> URL prefix
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".parquet", ".arrow", ".png", ".jpg", ".onnx", ".zip", ".gz", ".wasm")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the Hub also routes any file above 10 MB through LFS
SPACE_SDKS = {"gradio", "docker", "static", "streamlit"}


def git_blob_oid(content):
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Blob:
    content: bytes
    lfs: bool

    @property
    def sha256(self):
        return hashlib.sha256(self.content).hexdigest()

    @property
    def oid(self):
        # the git blob id: of the content, or of the LFS pointer that git would store in its place
        return git_blob_oid(self.pointer() if self.lfs else self.content)

    def pointer(self):
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n".encode()


@dataclass
class Commit:
    sha: str
    title: str
    date: str
    files: dict  # path -> Blob


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    sdk: str = None
    branches: dict = field(default_factory=dict)  # branch name -> commit sha
    commits: dict = field(default_factory=dict)  # commit sha -> Commit
    variables: dict = field(default_factory=dict)  # Space variables, key -> value

    def resolve(self, revision):
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)


class HubError(Exception):
    def __init__(self, status, message, code=None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """Holds the repos and serves them; `start()` runs it in a daemon thread."""

    def __init__(self, token="hf_guppylm_test_token", host="127.0.0.1", port=0, user="guppy"):
        self.token, self.user = token, user
        self.repos = {}  # (type, id) -> Repo
        self.lfs_objects = {}  # sha256 -> bytes, uploaded but maybe not yet committed
        self.unhandled = []  # "METHOD path (why)" of every request no route matched or a route could not handle
        self.log = []  # "METHOD path status" of every request
        self.lock = threading.RLock()
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self.endpoint = f"http://{host}:{self.httpd.server_address[1]}"
        self._commits = 0

    def start(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    # --- repo access ---------------------------------------------------------------------------

    def repo(self, repo_type, repo_id, authorized, write=False):
        repo = self.repos.get((repo_type, repo_id))
        if write and not authorized:
            raise HubError(401, "You must be authenticated to write to this repo")
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def commit_files(self, repo, branch, files, title):
        with self.lock:
            self._commits += 1
            sha = hashlib.sha1(f"{repo.type}/{repo.id}/{branch}/{self._commits}/{time.time()}".encode()).hexdigest()
            date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
            repo.commits[sha] = Commit(sha, title, date, files)
            repo.branches[branch] = sha
            return sha

    def create_repo(self, repo_type, repo_id, private, sdk=None):
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                return None
            repo = Repo(repo_type, repo_id, private, sdk)
            self.repos[(repo_type, repo_id)] = repo
            gitattributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
            self.commit_files(repo, "main", {".gitattributes": Blob(gitattributes.encode(), lfs=False)}, "initial commit")
            return repo

    def url(self, repo):
        return f"{self.endpoint}/{REPO_TYPES[repo.type]}{repo.id}"


def _make_handler(server):
    repo_id = r"(?P<repo>[^/]+/[^/]+)"
    rev = r"(?P<rev>[^/]+)"  # clients quote revisions with safe="", so a branch never holds a raw "/"
    api = rf"/api/(?P<type>models|datasets|spaces)/{repo_id}"
    prefixed = rf"/(?:(?P<type>datasets|spaces)/)?{repo_id}"
    routes = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", rf"{api}/preupload/{rev}", "preupload"),
        ("POST", rf"{api}/commit/{rev}", "commit"),
        ("POST", rf"{api}/branch/(?P<rev>.+)", "create_branch"),  # create_branch does not quote the name
        ("GET", rf"{api}(?:/revision/{rev})?", "repo_info"),
        ("GET", rf"{api}/tree/{rev}(?:/(?P<path>.+))?", "tree"),
        ("POST", rf"/api/spaces/{repo_id}/variables", "add_space_variable"),
        ("POST", rf"{prefixed}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("HEAD", rf"{prefixed}/resolve/{rev}/(?P<path>.+)", "resolve"),
        ("GET", rf"{prefixed}/resolve/{rev}/(?P<path>.+)", "resolve"),
    ]
    routes = [(method, re.compile(pattern + r"/?$"), name) for method, pattern, name in routes]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean; `server.log` has the requests
            pass

        # --- plumbing ------------------------------------------------------------------------

        def _dispatch(self):
            url = urlsplit(self.path)
            self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # always drain the body
            self.authorized = self._check_token()
            for method, pattern, name in routes:
                match = pattern.match(url.path) if method == self.command else None
                if match:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    if "type" in params:
                        params["type"] = {"models": "model", "datasets": "dataset", "spaces": "space"}[params["type"]]
                    params.setdefault("type", "model")
                    try:
                        if self.authorized is None:
                            raise HubError(401, "Invalid credentials in Authorization header")
                        return getattr(self, name)(**params)
                    except HubError as error:
                        return self._error(error.status, error.message, error.code)
                    except Exception as error:  # a request shape this server does not understand: protocol drift
                        server.unhandled.append(f"{self.command} {self.path} ({type(error).__name__}: {error})")
                        return self._error(500, f"hub_server.py failed on {self.command} {url.path}: {error!r}")
            server.unhandled.append(f"{self.command} {self.path}")
            self._error(501, f"hub_server.py does not implement {self.command} {url.path}")

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        def _check_token(self):
            """True for the valid token, False for none, None for a wrong one."""
            auth = self.headers.get("Authorization")
            if auth is None:
                return False
            return True if auth == f"Bearer {server.token}" else None

        def _send(self, status, body=b"", headers=None, content_type="application/json"):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            server.log.append(f"{self.command} {self.path} {status}")
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status, message, code=None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _json(self):
            return json.loads(self.body or b"{}")

        def _commit(self, repo, rev):
            commit = repo.resolve(rev)
            if commit is None:
                raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return commit

        # --- repos -----------------------------------------------------------------------------

        def create_repo(self, type):
            if not self.authorized:
                raise HubError(401, "You must be authenticated to create a repo")
            payload = self._json()
            repo_type = payload.get("type") or "model"
            repo_id = f"{payload.get('organization') or server.user}/{payload['name']}"
            if repo_type == "space" and payload.get("sdk") not in SPACE_SDKS:
                raise HubError(400, f"invalid Space sdk: {payload.get('sdk')!r}")
            private = payload.get("visibility") == "private" or payload.get("private") is True  # huggingface_hub 2 / 1.x
            repo = server.create_repo(repo_type, repo_id, private, payload.get("sdk"))
            url = server.url(server.repos[(repo_type, repo_id)])
            if repo is None:
                return self._send(409, {"error": "You already created this repo", "url": url})
            for variable in payload.get("variables") or []:
                repo.variables[variable["key"]] = variable["value"]
            self._send(200, {"url": url, "name": repo_id})

        def validate_yaml(self, type):
            # the Hub checks card metadata against each repo type's schema; a stdlib server checks a Space's sdk
            payload = self._json()
            header = re.match(r"^---\n(.*?)\n---\n", payload.get("content", ""), re.DOTALL)
            sdk = re.search(r"^sdk:\s*(\S+)\s*$", header[1] if header else "", re.MULTILINE)
            if payload.get("repoType") == "space" and (sdk is None or sdk[1] not in SPACE_SDKS):
                return self._send(400, f'"sdk" must be one of {sorted(SPACE_SDKS)}', content_type="text/plain")
            self._send(200, {})

        def repo_info(self, type, repo, rev="main"):
            repo = server.repo(type, repo, self.authorized)
            commit = self._commit(repo, rev)
            info = {
                "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24],
                "id": repo.id,
                "author": repo.id.split("/")[0],
                "sha": commit.sha,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "lastModified": commit.date,
                "createdAt": commit.date,
                "siblings": [{"rfilename": path} for path in sorted(commit.files)],
            }
            if repo.type == "space":
                info["sdk"] = repo.sdk
            self._send(200, info)

        def create_branch(self, type, repo, rev):
            repo = server.repo(type, repo, self.authorized, write=True)
            if rev in repo.branches:
                return self._error(409, f"Reference {rev} already exists")
            start = self._json().get("startingPoint") or "main"
            source = self._commit(repo, start)
            repo.branches[rev] = source.sha
            self._send(200, {})

        # --- upload: preupload -> LFS batch -> PUT -> commit ----------------------------------

        def preupload(self, type, repo, rev):
            repo = server.repo(type, repo, self.authorized, write=True)
            files = self._commit(repo, rev).files
            answer = []
            for entry in self._json()["files"]:
                path, sample = entry["path"], base64.b64decode(entry["sample"])
                lfs = path.endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE or b"\0" in sample
                existing = files.get(path)
                oid = None if existing is None else (existing.sha256 if existing.lfs else git_blob_oid(existing.content))
                answer.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
            self._send(200, {"files": answer})

        def lfs_batch(self, type, repo):
            server.repo(type, repo, self.authorized, write=True)
            payload = self._json()
            if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
                raise HubError(400, f"hub_server.py only supports basic LFS uploads, got {payload}")
            host = f"http://{self.headers['Host']}"
            objects = []
            for obj in payload["objects"]:
                answer = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in server.lfs_objects:
                    answer["actions"] = {"upload": {"href": f"{host}/lfs-upload/{obj['oid']}", "header": {}}}
                objects.append(answer)
            self._send(200, {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json")

        def lfs_put(self, type, oid):
            # the upload URL is pre-signed on the real Hub, so this route needs no token
            if hashlib.sha256(self.body).hexdigest() != oid:
                raise HubError(400, "LFS object does not match its sha256")
            server.lfs_objects[oid] = self.body
            self._send(200, b"", content_type="text/plain")

        def commit(self, type, repo, rev):
            repo = server.repo(type, repo, self.authorized, write=True)
            if self.query.get("create_pr"):
                server.unhandled.append(f"{self.command} {self.path} (create_pr)")
                raise HubError(501, "hub_server.py does not implement pull requests")
            if rev not in repo.branches:
                raise HubError(400, f"cannot commit to {rev!r}: not a branch")
            with server.lock:
                head = self._commit(repo, rev)
                files = dict(head.files)
                title = "commit"
                for line in self.body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        title = value["summary"]
                        if value.get("parentCommit") not in (None, head.sha):
                            raise HubError(412, "parentCommit is not the head of the branch")
                    elif key == "file":
                        files[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
                    elif key == "lfsFile":
                        if value["oid"] not in server.lfs_objects:
                            raise HubError(422, f"LFS object {value['oid']} was never uploaded")
                        files[value["path"]] = Blob(server.lfs_objects[value["oid"]], lfs=True)
                    elif key == "deletedFile":
                        if files.pop(value["path"], None) is None:
                            raise HubError(404, f"cannot delete missing file {value['path']}", "EntryNotFound")
                    elif key == "deletedFolder":
                        prefix = value["path"].rstrip("/") + "/"
                        files = {path: blob for path, blob in files.items() if not path.startswith(prefix)}
                    else:
                        server.unhandled.append(f"{self.command} {self.path} (commit key {key!r})")
                        raise HubError(501, f"hub_server.py does not implement commit operation {key!r}")
                sha = server.commit_files(repo, rev, files, title)
            self._send(200, {"success": True, "commitOid": sha, "commitUrl": f"{server.url(repo)}/commit/{sha}", "pullRequestUrl": None})

        # --- download --------------------------------------------------------------------------

        def _entries(self, commit, path, recursive, expand):
            """Tree entries under `path`: files and the folders between them."""
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            entries = {}
            for file_path in sorted(commit.files):
                if not file_path.startswith(prefix):
                    continue
                parts = file_path[len(prefix):].split("/")
                for depth in range(1, len(parts)):  # the folders on the way to this file
                    folder = prefix + "/".join(parts[:depth])
                    if depth == 1 or recursive:
                        entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0, "oid": git_blob_oid(folder.encode())})
                if len(parts) == 1 or recursive:
                    entries[file_path] = self._file_entry(commit, file_path, expand)
            if prefix and not entries:
                raise HubError(404, f"{path} does not exist on {commit.sha}", "EntryNotFound")
            return list(entries.values())

        def _file_entry(self, commit, path, expand):
            blob = commit.files[path]
            entry = {"type": "file", "path": path, "size": len(blob.content), "oid": blob.oid}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": len(blob.pointer())}
            if expand:
                entry["lastCommit"] = {"id": commit.sha, "title": commit.title, "date": commit.date}
            return entry

        def tree(self, type, repo, rev, path=""):
            commit = self._commit(server.repo(type, repo, self.authorized), rev)
            recursive = self.query.get("recursive", "false").lower() == "true"
            expand = self.query.get("expand", "false").lower() == "true"
            self._send(200, self._entries(commit, path, recursive, expand))

        def resolve(self, type, repo, rev, path):
            repo = server.repo(type, repo, self.authorized)
            commit = self._commit(repo, rev)
            blob = commit.files.get(path)
            if blob is None:
                raise HubError(404, f"{path} does not exist on {commit.sha}", "EntryNotFound")
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{blob.oid}"'}
            if blob.lfs:  # the real Hub redirects LFS files to a CDN; these headers describe the target
                headers.update({"ETag": f'"{blob.sha256}"', "X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.content))})
            if self.headers.get("Range"):  # clients only ask for ranges to resume a download
                server.unhandled.append(f"{self.command} {self.path} (Range: {self.headers['Range']})")
                raise HubError(501, "hub_server.py does not implement Range requests")
            self._send(200, blob.content, headers, content_type="application/octet-stream")

        # --- Space variables -------------------------------------------------------------------

        def add_space_variable(self, type, repo):
            repo = server.repo("space", repo, self.authorized, write=True)
            payload = self._json()
            repo.variables[payload["key"]] = payload["value"]
            self._send(200, {key: {"value": value} for key, value in repo.variables.items()})

    return Handler


def main():
    parser = argparse.ArgumentParser(description="Serve a Hub-compatible API on 127.0.0.1 for tests.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default="hf_guppylm_test_token")
    args = parser.parse_args()
    server = HubServer(token=args.token, port=args.port)
    print(f"serving the Hub API at {server.endpoint}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
