"""The Hugging Face hub over raw HTTP, for weights/download.py: HEAD metadata, redirects, retries with backoff,
and a one-line DownloadError for each answer a user can act on.

What to read: `modelscope-architecture.md` §2 (the repositories and files); weights/download.py (the download).

Official implementation: huggingface_hub's `hf_hub_download` (file_download.py); this speaks the same HTTP
(`/resolve/{revision}/{path}`, X-Linked-Size, X-Linked-Etag, X-Repo-Commit) with no dependency on it.
"""
import re
import time
from urllib.parse import quote, urljoin, urlparse


class DownloadError(Exception):
    """A download that cannot complete. The message is one line: what, where and what to do."""


def short(why):
    return re.sub(r"\s+", " ", str(why))[:160]


class Hub:
    def __init__(self, endpoint, token, repo, revision, retries, backoff, say):
        self.endpoint, self.token, self.repo, self.revision, self.say = endpoint, token, repo, revision, say
        self.rev = revision  # becomes the commit after the first HEAD, so that all files match
        self.retries, self.backoff = retries, backoff
        import requests  # here, not at the top: every CLI start imports this module, few download
        self.session = requests.Session()
        self.session.headers.update({"Accept-Encoding": "identity", "User-Agent": "lvd-download/1"})

    def url(self, rel):
        return f"{self.endpoint}/{self.repo}/resolve/{quote(self.rev, safe='')}/{quote(rel)}"

    def headers(self, url, extra=None):
        """Authorization only for the endpoint's own host (requests strips it on a CDN redirect)."""
        h = dict(extra or {})
        if self.token and urlparse(url).netloc == urlparse(self.endpoint).netloc:
            h["Authorization"] = f"Bearer {self.token}"
        return h

    def pause(self, fails):
        time.sleep(min(self.backoff * 2 ** (fails - 1), 30.0))

    def unreachable(self, rel, why):
        return DownloadError(f"{self.repo}/{rel}: no answer from {urlparse(self.endpoint).netloc} after "
                             f"{self.retries + 1} attempts ({short(why)}); check the network, or set "
                             "HF_ENDPOINT to a mirror")

    def check(self, r, rel):
        """Raise the DownloadError that a 4xx answer means."""
        code, ec = r.status_code, r.headers.get("X-Error-Code", "")
        if code < 400:
            return
        if urlparse(r.url).netloc != urlparse(self.endpoint).netloc:  # e.g. the CDN
            raise DownloadError(f"{self.repo}/{rel}: HTTP {code} from {urlparse(r.url).netloc}")
        if code == 403 or ec == "GatedRepo":
            raise DownloadError(f"{self.repo}: access refused (HTTP {code}): accept the model's license at "
                                f"{self.endpoint}/{self.repo} and set HF_TOKEN to a token of that account")
        if code == 401 and self.token:
            raise DownloadError(f"{self.repo}: HF_TOKEN was not accepted (HTTP 401): check the token and that "
                                "it may read this repository (and accept the license on its page)")
        if code == 401:
            raise DownloadError(f"{self.repo}: authentication needed (HTTP 401): the repository is private, gated "
                                "or does not exist; set HF_TOKEN (and accept the license on its page)")
        if code == 404:
            raise DownloadError({
                "RepoNotFound": f"repository {self.repo} not found on {self.endpoint} (HTTP 404)",
                "RevisionNotFound": f"revision {self.revision!r} not found in {self.repo} (HTTP 404)",
                "EntryNotFound": f"file {rel} not found in {self.repo} at revision {self.revision} (HTTP 404)",
            }.get(ec, f"{rel} not found in {self.repo} at revision {self.revision} (HTTP 404: the repository, "
                      "revision or file is missing)"))
        raise DownloadError(f"{self.repo}/{rel}: HTTP {code} from {urlparse(r.url).netloc}")

    def head(self, rel):
        """(size, etag, lfs) of one remote file; pins self.rev to the commit the hub reports."""
        import requests
        url, fails, hops = self.url(rel), 0, 0
        while True:
            try:
                r = self.session.head(url, headers=self.headers(url), allow_redirects=False, timeout=(10, 60))
            except (requests.ConnectionError, requests.Timeout) as e:
                r, why = None, e
            if r is not None and r.status_code != 429 and r.status_code < 500:
                loc = r.headers.get("Location")
                same_site = loc and urlparse(urljoin(url, loc)).netloc == urlparse(url).netloc
                if 300 <= r.status_code < 400 and loc and (same_site or "X-Linked-Size" not in r.headers) and hops < 5:
                    url, hops = urljoin(url, loc), hops + 1  # a renamed repository, or a mirror's redirect
                    continue
                break
            why = why if r is None else f"HTTP {r.status_code}"
            fails += 1
            if fails > self.retries:
                raise self.unreachable(rel, why)
            self.pause(fails)
        self.check(r, rel)
        size = r.headers.get("X-Linked-Size") or r.headers.get("Content-Length")
        if size is None or not size.isdigit():
            raise DownloadError(f"{self.repo}/{rel}: {self.endpoint} reported no file size (is it a Hugging Face hub?)")
        etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").removeprefix("W/").strip('"').lower()
        if r.headers.get("X-Repo-Commit"):
            self.rev = r.headers["X-Repo-Commit"]
        return int(size), etag, "X-Linked-Etag" in r.headers
