"""A stand-in for vLLM's OpenAI-compatible server (`vllm serve`), wrapping a local model, for the served-teacher tests.

It answers the two endpoints [`trl_distill.teachers.served`] uses, with vLLM's response shapes:

- `GET /v1/models` -> `{"object": "list", "data": [{"id": NAME, "object": "model", ...}]}`
- `POST /v1/completions` with token-id prompts, `max_tokens`, `prompt_logprobs: k`, `temperature` -> one choice per
  prompt whose `prompt_logprobs` is `[null, {"<id>": {"logprob", "rank", "decoded_token"}, ...}, ...]`: at each
  position the top-k of the log-softmax of the raw logits (as vLLM's default `raw_logprobs` mode; the temperature is
  ignored unless `apply_temperature`), plus the prompt's own token when it is not among them.

Failure modes are scripted per completions request (`faults`, consumed in order, then `persistent_fault` for every
later one): `"timeout"` (answers after `delay` seconds), `"500"`, `"reset"` (closes the connection without an answer),
`"missing"` (no `prompt_logprobs`), `"no_rank"` (entries without `rank`), `"unnormalized"` (log-probabilities + 3).

The server stops by itself after `lifetime` seconds or `max_requests` requests, whichever comes first. From a shell:
`python tests/served_teacher_server.py --model DIR --port 8000` (prints its URL).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from typing_extensions import Self


class StandInServer:
    def __init__(
        self,
        model,
        *,
        name: str = "stand-in-teacher",
        faults=(),
        persistent_fault: str | None = None,
        delay: float = 2.0,
        apply_temperature: bool = False,
        lifetime: float = 120.0,
        max_requests: int = 500,
        port: int = 0,
    ):
        self.model, self.name = model.eval(), name
        self.faults, self.persistent_fault, self.delay = list(faults), persistent_fault, delay
        self.apply_temperature = apply_temperature
        self.lifetime, self.max_requests = lifetime, max_requests
        self.requests: list[dict] = []  # the completions payloads received (for the tests)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._stopped = threading.Event()

    def start(self) -> StandInServer:
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        threading.Thread(target=self._watchdog, daemon=True).start()
        return self

    def _watchdog(self) -> None:
        deadline = time.monotonic() + self.lifetime
        while not self._stopped.wait(0.1):
            if time.monotonic() > deadline or len(self.requests) >= self.max_requests:
                self.stop()

    def stop(self) -> None:
        if not self._stopped.is_set():
            self._stopped.set()
            threading.Thread(target=self._httpd.shutdown, daemon=True).start()
            self._httpd.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _next_fault(self) -> str | None:
        with self._lock:
            return self.faults.pop(0) if self.faults else self.persistent_fault

    def prompt_logprobs(self, prompt: list[int], k: int, temperature: float) -> list:
        with self._lock, torch.no_grad():
            logits = self.model(torch.tensor([prompt])).logits[0].float()
        if self.apply_temperature:
            logits = logits / temperature
        log_probs = logits.log_softmax(-1)
        top_values, top_ids = log_probs.topk(k, dim=-1)
        answer = [None]
        for j in range(1, len(prompt)):
            row = log_probs[j - 1]
            entries = {
                str(int(t)): {"logprob": float(v), "rank": rank + 1, "decoded_token": f"<{int(t)}>"}
                for rank, (v, t) in enumerate(zip(top_values[j - 1], top_ids[j - 1]))
            }
            token = prompt[j]
            if str(token) not in entries:
                rank = int((row > row[token]).sum()) + 1
                entries[str(token)] = {"logprob": float(row[token]), "rank": rank, "decoded_token": f"<{token}>"}
            answer.append(entries)
        return answer

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path != "/v1/models":
                    return self._send(404, {"object": "error", "message": f"no route {self.path}"})
                card = {"id": server.name, "object": "model", "owned_by": "vllm", "root": server.name}
                self._send(200, {"object": "list", "data": [card]})

            def do_POST(self):
                if self.path != "/v1/completions":
                    return self._send(404, {"object": "error", "message": f"no route {self.path}"})
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(payload)
                fault = server._next_fault()
                try:
                    if fault == "timeout":
                        time.sleep(server.delay)
                    elif fault == "500":
                        return self._send(500, {"object": "error", "message": "internal error", "code": 500})
                    elif fault == "reset":
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return None
                    if payload.get("model") != server.name:
                        return self._send(404, {"object": "error", "message": f"model {payload.get('model')!r}"})
                    prompts = payload["prompt"]
                    prompts = [prompts] if prompts and isinstance(prompts[0], int) else prompts
                    choices = []
                    for index, prompt in enumerate(prompts):
                        choice = {"index": index, "text": "", "logprobs": None, "finish_reason": "length"}
                        k, temperature = payload.get("prompt_logprobs"), payload.get("temperature", 1.0)
                        logprobs = server.prompt_logprobs(prompt, k, temperature) if k else None
                        if fault == "unnormalized":
                            for entries in logprobs[1:]:
                                for entry in entries.values():
                                    entry["logprob"] += 3.0
                        if fault == "no_rank":
                            for entries in logprobs[1:]:
                                for entry in entries.values():
                                    del entry["rank"]
                        if fault != "missing":
                            choice["prompt_logprobs"] = logprobs
                        choices.append(choice)
                    self._send(
                        200,
                        {
                            "id": "cmpl-0",
                            "object": "text_completion",
                            "created": int(time.time()),
                            "model": server.name,
                            "choices": choices[::-1],
                        },
                    )
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass  # the client gave up (timeout) or the fault closed the socket

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local transformers model directory")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--lifetime", type=float, default=600.0)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    server = StandInServer(
        AutoModelForCausalLM.from_pretrained(args.model),
        name=args.model,
        port=args.port,
        lifetime=args.lifetime,
        max_requests=10**9,
    ).start()
    print(server.url, flush=True)
    server._stopped.wait()


if __name__ == "__main__":
    main()
