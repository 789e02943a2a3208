"""An OpenAI-compatible server (vLLM, SGLang, `transformers serve`, OpenAI) as the engine: eval.py's answers
(--engine api), alttrain.py's assessment sentences (--ha-api-base) and served judges (--judge-api-model).

Plain HTTP (urllib), not the `openai` package: three endpoints are used (GET /models, POST /completions and
/chat/completions), every failure must become one line naming the flag, the URL and what was asked, and the
retries must say what they retry. The package's own retries and exception types would need translating
anyway, and a user whose server runs on another machine installs nothing more here.

Traps handled here (docs/serving.md):
- The same TOKENS as the HF path. A text prompt is tokenized by the server WITH special tokens
  (`transformers serve` calls `tokenizer(prompt)`; vLLM adds them by default), so a prompt rendered with its BOS
  gets two. The client sends token ids where the server takes them (vLLM, SGLang); a server that takes only
  text (`transformers serve`: 400 "prompt must be a string") gets the text of the ids without the BOS it will
  add again, and only after checking here, with the same tokenizer, that this text gives back exactly the ids.
  Every answer's usage.prompt_tokens is checked against the number of ids the HF path generates from.
- Greedy is temperature 0 (the server's own sampling defaults otherwise apply).
- 429, 5xx and dropped connections are retried with exponential backoff (Retry-After honoured); a wrong URL,
  a wrong model name, a missing or refused key fail at once with one line; a timeout says what it waited for.
- The key comes from OPENAI_API_KEY and is sent, never printed or stored."""
from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm.auto import tqdm

from .files import UserError

RETRIES = 5          # tries after the first, on 429 / 5xx / a dropped connection: ~0.5+1+2+4+8 s of waiting
BACKOFF = 0.5        # seconds before the first retry, doubled each time (plus up to 25% jitter), at most 30 s


class Server:
    """One model on one server. `flag` names the flags the user gave (for errors), e.g. '--api-base/--api-model'."""

    def __init__(self, base: str, model: str, flag: str = "--api-base", concurrency: int = 8,
                 timeout: float = 600.0, retries: int = RETRIES, backoff: float = BACKOFF):
        if not base or not base.startswith(("http://", "https://")):
            raise UserError(f"{flag} {base!r}: not an http(s) URL (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise UserError(f"{flag}: the served model's name is missing")
        self.base, self.model, self.flag = base.rstrip("/"), model, flag
        self.concurrency, self.timeout, self.retries, self.backoff = concurrency, timeout, retries, backoff
        self.key = os.environ.get("OPENAI_API_KEY") or None  # never stored in any file
        self.prompt_mode = None  # "ids" or "text": found at the first completion (see module docstring)
        self._lock = threading.Lock()  # held while the first request finds the prompt mode
        self._count_lock = threading.Lock()
        self.retried = 0  # requests retried (429 / 5xx / connection)

    def describe(self) -> dict:
        """What results.json and a run's config record: engine, model and URL (never the key)."""
        return dict(engine="api", api_model=self.model, api_base=self.base, api_prompt=self.prompt_mode)

    # ---------------------------------------------------------------------------------------------------
    # HTTP: one request, retried where retrying can help; every failure one line
    # ---------------------------------------------------------------------------------------------------
    def request(self, path: str, body: dict | None = None, what: str = "", retry_connection: bool = True) -> dict:
        url = self.base + path
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        where = f"{self.flag} {url}"
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            wait_s, why = None, ""
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = _detail(e)
                if e.code == 429 or e.code >= 500:
                    why = f"HTTP {e.code} {detail}"
                    wait_s = _retry_after(e)
                elif e.code in (401, 403):
                    raise UserError(f"{where}: the server refused the request (HTTP {e.code}: {detail}): "
                                    + ("the key in OPENAI_API_KEY was not accepted" if self.key else
                                       "it wants a key; set OPENAI_API_KEY")) from None
                elif e.code == 404:
                    raise UserError(f"{where}: not found (HTTP 404): not an OpenAI-compatible base URL? It usually "
                                    "ends in /v1 (e.g. http://127.0.0.1:8000/v1)") from None
                else:  # 400, 422: the request's fault (a wrong model name, too long a prompt): retrying cannot help
                    raise ApiError(e.code, f"{where}: {what} refused (HTTP {e.code}: {detail})") from None
            except (TimeoutError, socket.timeout):
                raise UserError(f"{where}: no answer within {self.timeout:g} s to {what} (the model "
                                f"{self.model!r}; raise --api-timeout for long generations)") from None
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise UserError(f"{where}: no answer within {self.timeout:g} s to {what} (the model "
                                    f"{self.model!r}; raise --api-timeout for long generations)") from None
                if not retry_connection:
                    raise UserError(f"{where}: no server answers there ({type(reason).__name__}: {reason}); "
                                    "is it running, and are the host and port right?") from None
                why = f"connection failed ({type(reason).__name__}: {reason})"
            if attempt == self.retries:
                raise UserError(f"{where}: {what} failed {self.retries + 1} times, the last: {why}")
            with self._count_lock:
                self.retried += 1
            delay = wait_s if wait_s is not None else min(30.0, self.backoff * 2 ** attempt)
            time.sleep(delay * (1 + 0.25 * random.random()))
        raise AssertionError("unreachable")

    def check(self) -> "Server":
        """Before any work: the server answers, takes the key, and serves this model (one clear line if not)."""
        listing = self.request("/models", what="listing its models (GET /models)", retry_connection=False)
        names = [m.get("id") for m in listing.get("data", []) if isinstance(m, dict)]
        if names and self.model not in names:
            raise UserError(f"{self.flag}: the server at {self.base} does not serve {self.model!r}; it serves "
                            f"{', '.join(map(repr, names[:10]))}")
        return self

    # ---------------------------------------------------------------------------------------------------
    # Completions from token ids (the HF path's exact tokens), and chat completions
    # ---------------------------------------------------------------------------------------------------
    def sampling(self, do_sample: bool = False, temperature: float = 0.6, top_p: float = 0.95,
                 seed: int | None = None) -> dict:
        return dict(temperature=temperature, top_p=top_p, **({} if seed is None else {"seed": seed})) \
            if do_sample else dict(temperature=0.0)

    def complete(self, tok, ids: list[int], max_tokens: int, sampling: dict | None = None) -> tuple[str, int, bool]:
        """Generate after the prompt `ids` -> (text, new tokens counted as the HF path counts them, ended by
        the model rather than by max_tokens)."""
        body = dict(model=self.model, max_tokens=max_tokens, **(sampling or dict(temperature=0.0)))
        what = f"a completion of {len(ids)} prompt tokens"
        if self.prompt_mode is None:
            with self._lock:  # the first request finds out whether this server takes token ids
                if self.prompt_mode is None:
                    try:
                        out = self.request("/completions", dict(body, prompt=ids), what)
                        self.prompt_mode = "ids"
                        return self._answer(out, ids, max_tokens)
                    except ApiError as e:
                        if "prompt" not in str(e).split("refused", 1)[-1].lower():
                            raise  # refused for another reason (a wrong model name): say so
                        self.prompt_mode = "text"  # e.g. transformers serve: 400 "prompt must be a string"
        prompt = ids if self.prompt_mode == "ids" else prompt_text(tok, ids, self.flag)
        return self._answer(self.request("/completions", dict(body, prompt=prompt), what), ids, max_tokens)

    def _answer(self, out: dict, ids: list[int], max_tokens: int) -> tuple[str, int, bool]:
        choice, usage = out["choices"][0], out.get("usage") or {}
        seen = usage.get("prompt_tokens")
        if seen is not None and seen != len(ids):
            raise UserError(f"{self.flag} {self.base}: the server read {seen} prompt tokens where the HF path "
                            f"generates from {len(ids)} (prompt sent as {self.prompt_mode}): it would answer "
                            "another prompt. Serve the same tokenizer, or a server that takes token ids (vLLM)")
        n = usage.get("completion_tokens")
        finished = choice.get("finish_reason") not in ("length", None)
        return choice.get("text", ""), (n if n is not None else max_tokens), finished

    def chat(self, messages: list[dict], max_tokens: int, sampling: dict | None = None) -> tuple[str, int, bool]:
        """A chat completion: the server applies the model's own chat template (GPT-4o, a served judge)."""
        out = self.request("/chat/completions", dict(model=self.model, messages=messages, max_tokens=max_tokens,
                                                     **(sampling or dict(temperature=0.0))),
                           f"a chat completion of {len(messages)} messages")
        choice, usage = out["choices"][0], out.get("usage") or {}
        return ((choice.get("message") or {}).get("content") or "", usage.get("completion_tokens", 0),
                choice.get("finish_reason") not in ("length", None))

    # ---------------------------------------------------------------------------------------------------
    # Many requests: up to `concurrency` in flight (the server batches them), results as they arrive
    # ---------------------------------------------------------------------------------------------------
    def as_completed(self, calls: list, desc: str | None = None, unit: str = "answer"):
        """Run the zero-argument `calls` with up to `concurrency` in flight; yield (index, result) as each
        ends, so the caller can write it at once. The first error stops the rest and is raised. A bar if `desc`."""
        bar = tqdm(total=len(calls), desc=desc, unit=unit, disable=desc is None)
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        pending, k = {}, 0
        try:
            while k < len(calls) or pending:
                while k < len(calls) and len(pending) < 2 * self.concurrency:  # a little queued, not everything
                    pending[pool.submit(calls[k])] = k
                    k += 1
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    i = pending.pop(f)
                    result = f.result()  # raises the request's error
                    bar.update(1)
                    yield i, result
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)
            bar.close()

    def run_all(self, calls: list, desc: str | None = None, unit: str = "answer") -> list:
        """The results of `calls`, in order (for judges and assessments, which keep them all)."""
        results = [None] * len(calls)
        for i, r in self.as_completed(calls, desc, unit):
            results[i] = r
        return results


class ApiError(UserError):
    """A request the server refused as the request's fault (HTTP 400/422): not retried."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _detail(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode("utf-8", "replace")
        j = json.loads(body)
        msg = j.get("detail") or j.get("error") or j.get("message") or body
        if isinstance(msg, dict):
            msg = msg.get("message", msg)
        return str(msg)[:300]
    except Exception:
        return str(e.reason)[:300]


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return min(60.0, float(e.headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


_TOKENIZER_LOCK = threading.Lock()


def prompt_text(tok, ids: list[int], flag: str = "--api-base") -> str:
    """Text that a server which tokenizes WITH special tokens turns into exactly `ids`: the ids' text without
    the BOS the tokenizer adds again (the double-BOS trap). Checked here with the same tokenizer."""
    from .chat import adds_bos
    with _TOKENIZER_LOCK:  # requests run in threads; a tokenizer's Python side is not promised to be thread-safe
        body = ids[1:] if adds_bos(tok) and ids and ids[0] == tok.bos_token_id else ids
        text = tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        same = tok(text).input_ids == ids
    if not same:
        raise UserError(f"{flag}: this server takes prompts only as text, and the text of this prompt does not "
                        "tokenize back to the same tokens; use a server that takes token ids (vLLM, SGLang)")
    return text


def connect(base: str, model: str, flag: str, concurrency: int = 8, timeout: float = 600.0) -> Server:
    """A checked Server (answers, key taken, model served), or one clear line."""
    if concurrency < 1:
        raise UserError(f"{flag}: --api-concurrency must be at least 1")
    return Server(base, model, flag, concurrency, timeout).check()


def check_flags(args) -> None:
    """eval.py: the flags --engine api and a served judge need, each named, before anything is loaded."""
    from . import distributed as dist
    if args.engine == "api":
        if not args.api_base or not args.api_model:
            raise UserError("--engine api needs --api-base URL (e.g. http://127.0.0.1:8000/v1) and --api-model NAME")
        if args.defense != "none":
            raise UserError("--engine api: --defense ia runs locally only (--engine hf)")
        if dist.world() > 1:
            raise UserError("--engine api runs in one process (python eval.py): the server spreads the work itself")
    elif args.api_base or args.api_model:
        if not args.judge_api_model:
            raise UserError("--api-base/--api-model are for --engine api or a served judge (--judge-api-model)")
    if args.api_concurrency < 1 or args.api_timeout <= 0:
        raise UserError("--api-concurrency must be at least 1 and --api-timeout positive")
    if args.judge == "strongreject-rubric" and not args.judge_api_model:
        raise UserError("--judge strongreject-rubric needs a served chat model: --judge-api-model NAME "
                        "(e.g. gpt-4o-mini, as StrongREJECT's authors) and --judge-api-base or --api-base")
    if args.judge_api_model and args.judge == "keywords":
        raise UserError("--judge-api-model names a model judge: pass --judge qwen3guard, llama-guard-3-1b or "
                        "strongreject-rubric")
    if args.judge_api_model and not (args.judge_api_base or args.api_base):
        raise UserError("--judge-api-model needs the judge's server: --judge-api-base URL (or --api-base)")
