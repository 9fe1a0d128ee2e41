"""A served teacher: top-k targets from a teacher behind vLLM's OpenAI-compatible completions server.

A teacher too big to load beside the student (70B, 405B) is served by vLLM on other machines; this module asks it for
the log-probabilities of every prompt position and turns them into the same top-k targets as the in-process teacher:

```
POST {url}/v1/completions
{"model": NAME, "prompt": [[ids...], ...], "max_tokens": 1, "prompt_logprobs": k, "temperature": 1.0}
-> {"choices": [{"index": i, "prompt_logprobs": [null, {"<id>": {"logprob": -0.1, "rank": 1, ...}, ...], ...}]}
```

`prompt_logprobs[j]` is the distribution of token `j` given tokens `< j` (the first is `null`): the `k` most likely
ids with their log-probabilities and ranks (1 = most likely), plus the prompt's own token `j` when it is not among
them. Position `i` of a row predicts token `i + 1`, so its targets are `prompt_logprobs[i + 1]` restricted to the
ranks `<= k`.

What is assumed, and checked:

- **Normalized log-probabilities** (vLLM's default `--logprobs-mode raw_logprobs`: a log-softmax of the raw logits).
  The "other" bucket is then exactly the mass outside the top-k, `log(1 - sum exp(top-k))`, computed in float64 as
  `log(-expm1(logsumexp(top-k)))`. A position whose top-k sum above `1 + normalization_tolerance` is refused with
  [`UnnormalizedLogProbsError`] (a server returning logits or processed scores); a deficit cannot be detected.
- **Temperature**: vLLM computes prompt log-probabilities from the raw logits and ignores the request's `temperature`
  for them. From top-k log-probabilities at temperature 1 the log-probabilities at another temperature cannot be
  recovered (the normalizer needs the whole vocabulary), so `kd_temperature` must be 1.0, unless the server is known
  to apply the temperature (`server_applies_temperature=True`, e.g. a patched vLLM); this is then probed once: a server
  whose answers do not change with the temperature is refused.
- **vLLM limits**: start the server with `--max-logprobs` at least `k` (the default is 20) and a `--max-model-len`
  above the longest row.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..digests import tokenizer_sha256
from ..losses import TopKTargets
from . import codec
from .store import batch_row_keys, tokenization_settings, write_json, write_shard


logger = logging.getLogger(__name__)

_MIN_LOG_PROB = -88.0  # float32's smallest normal is exp(-87.3); the codec clamps "other" there too
_TRANSIENT_ERRORS = (TimeoutError, socket.timeout, ConnectionError, http.client.HTTPException, urllib.error.URLError)


class ServedTeacherError(RuntimeError):
    """The teacher server failed (after the retries allowed) or answered outside the protocol."""


class MissingPromptLogprobsError(ServedTeacherError):
    """The server answered without per-position `prompt_logprobs` (not vLLM's OpenAI-compatible server?)."""


class UnnormalizedLogProbsError(ServedTeacherError, ValueError):
    """A position's top-k probabilities sum above 1: the server does not return normalized log-probabilities."""


class ServedTeacher:
    r"""Client of a teacher served by vLLM (`vllm serve`) that scores token-id rows with `prompt_logprobs`.

    Args:
        url (`str`): the server's base URL, e.g. `"http://10.0.0.5:8000"` (with or without a trailing `/v1`).
        top_k (`int`): `prompt_logprobs` asked per position (the store's k).
        temperature (`float`): the KD temperature the log-probabilities must be at; 1.0 unless
            `server_applies_temperature` (see the module docstring).
        model (`str`, *optional*): the served model name; default the first one `GET /v1/models` reports. Either way
            it must be one the server reports.
        server_applies_temperature (`bool`): the server applies `temperature` to prompt log-probabilities (vLLM does
            not); probed once.
        prompts_per_request (`int`): rows sent in one request.
        max_concurrency (`int`): requests in flight at once.
        timeout (`float`): seconds per request before it counts as failed (and is retried).
        max_retries (`int`): retries of a request after a transient error (timeout, connection reset or refused,
            HTTP 429 or 5xx), with exponential backoff `backoff * 2**attempt` capped at `max_backoff` seconds.
        normalization_tolerance (`float`): top-k sums up to `1 + normalization_tolerance` are accepted (rounding).
        api_key (`str`, *optional*): sent as `Authorization: Bearer ...` (`vllm serve --api-key`); default the
            `TRL_DISTILL_TEACHER_API_KEY` environment variable. Never recorded.
    """

    def __init__(
        self,
        url: str,
        *,
        top_k: int,
        temperature: float = 1.0,
        model: str | None = None,
        server_applies_temperature: bool = False,
        prompts_per_request: int = 8,
        max_concurrency: int = 4,
        timeout: float = 120.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        normalization_tolerance: float = 1e-3,
        api_key: str | None = None,
    ):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"`teacher_url` must be an http(s) URL such as 'http://host:8000', got {url!r}.")
        for name, value in (
            ("top_k", top_k),
            ("prompts_per_request", prompts_per_request),
            ("max_concurrency", max_concurrency),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be a non-negative integer, got {max_retries!r}.")
        for name, value in (("temperature", temperature), ("timeout", timeout)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
        if float(temperature) != 1.0 and not server_applies_temperature:
            raise ValueError(
                f"`kd_temperature={temperature}` with a served teacher: vLLM's prompt log-probabilities are taken "
                "from the raw logits (it ignores `temperature` for them), and top-k log-probabilities at temperature "
                "1 cannot be converted to another temperature (the normalizer needs the whole vocabulary). Set "
                "`kd_temperature=1.0`, or serve a teacher that applies the temperature to prompt log-probabilities "
                "and pass `server_applies_temperature=True`."
            )
        self.base_url = url.rstrip("/").removesuffix("/v1")
        self.top_k, self.temperature = top_k, float(temperature)
        self.server_applies_temperature = bool(server_applies_temperature)
        self.prompts_per_request, self.max_concurrency = prompts_per_request, max_concurrency
        self.timeout, self.max_retries = float(timeout), max_retries
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.normalization_tolerance = float(normalization_tolerance)
        self._api_key = api_key if api_key is not None else os.environ.get("TRL_DISTILL_TEACHER_API_KEY")
        self.model = self._served_model(model)
        if self.server_applies_temperature and self.temperature != 1.0:
            self._probe_temperature()

    # -- protocol ----------------------------------------------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """What the store's manifest records about the server and the requests (no credentials)."""
        return {
            "url": self.base_url,
            "model": self.model,
            "model_root": self.model_card["root"],
            "max_model_len": self.model_card["max_model_len"],
            "protocol": "openai-completions/prompt_logprobs",
            "top_k": self.top_k,
            "temperature": self.temperature,
            "server_applies_temperature": self.server_applies_temperature,
            "normalization_tolerance": self.normalization_tolerance,
            "prompts_per_request": self.prompts_per_request,
            "max_concurrency": self.max_concurrency,
            "timeout": self.timeout,
            "max_retries": self.max_retries,
        }

    def _request(self, path: str, payload: dict | None = None) -> dict:
        """One JSON request with bounded retries and exponential backoff on transient errors."""
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = None if payload is None else json.dumps(payload).encode()
        last = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            request = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:  # before URLError, its base class
                try:
                    body = error.read()[:300].decode(errors="replace")
                except OSError:  # the connection dropped while reading the error body
                    body = ""
                if error.code != 429 and error.code < 500:
                    raise ServedTeacherError(f"Teacher server {url} answered HTTP {error.code}: {body}") from None
                last = f"HTTP {error.code}: {body}"
            except (*_TRANSIENT_ERRORS, json.JSONDecodeError) as error:
                last = f"{type(error).__name__}: {error}"
            logger.warning("Teacher server %s: attempt %d failed (%s).", url, attempt + 1, last)
        raise ServedTeacherError(
            f"Teacher server {url} failed {self.max_retries + 1} times (last: {last}). Check that it is up and "
            "reachable, or raise `timeout` / `max_retries`."
        )

    def _served_model(self, model: str | None) -> str:
        answer = self._request("/v1/models")
        cards = {entry.get("id"): entry for entry in answer.get("data", []) if isinstance(entry, dict)}
        if not cards:
            raise ServedTeacherError(f"Teacher server {self.base_url}/v1/models reports no model: {str(answer)[:200]}")
        if model is not None and model not in cards:
            raise ValueError(
                f"`teacher_served_model={model!r}` is not served at {self.base_url}: it serves {list(cards)}."
            )
        model = next(iter(cards)) if model is None else model
        # vLLM's card: `root` is the checkpoint it loaded (Hub id or path), `max_model_len` its context.
        self.model_card = {key: cards[model].get(key) for key in ("root", "max_model_len", "owned_by")}
        return model

    def _probe_temperature(self) -> None:
        prompt = [[0, 1, 2, 3]]
        at_one = self._score_request(prompt, temperature=1.0)[0][1]
        at_t = self._score_request(prompt, temperature=self.temperature)[0][1]
        if torch.allclose(at_one, at_t, atol=1e-6):
            raise ValueError(
                f"`server_applies_temperature=True`, but {self.base_url} returns the same prompt log-probabilities at "
                f"temperature 1 and {self.temperature}: it ignores the temperature (as vLLM does). Set "
                "`kd_temperature=1.0` or serve a teacher that applies it."
            )

    def _score_request(self, prompts: list[list[int]], temperature: float | None = None) -> list[TopKTargets]:
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "prompt_logprobs": self.top_k,
            "temperature": self.temperature if temperature is None else temperature,
        }
        answer = self._request("/v1/completions", payload)
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise ServedTeacherError(
                f"Teacher server {self.base_url}: {len(prompts)} prompts sent, answer has "
                f"{len(choices) if isinstance(choices, list) else 'no'} `choices`."
            )
        choices = sorted(choices, key=lambda choice: choice.get("index", 0))
        return [self._parse(choice.get("prompt_logprobs"), prompt) for choice, prompt in zip(choices, prompts)]

    def _parse(self, positions: Any, prompt: list[int]) -> TopKTargets:
        """`(L - 1, k)` ids and `(L - 1, k + 1)` log-probabilities: row `i` predicts `prompt[i + 1]`."""
        if not isinstance(positions, list):
            raise MissingPromptLogprobsError(
                f"Teacher server {self.base_url} answered without `prompt_logprobs` (got {type(positions).__name__}). "
                "It must be vLLM's OpenAI-compatible server (`vllm serve`), which returns them for `prompt_logprobs: "
                "k` in a completions request."
            )
        if len(positions) != len(prompt):
            raise ServedTeacherError(
                f"Teacher server {self.base_url}: {len(positions)} `prompt_logprobs` for a prompt of {len(prompt)} "
                "tokens (the server may have truncated it: raise its `--max-model-len`)."
            )
        ids = torch.empty((len(prompt) - 1, self.top_k), dtype=torch.long)
        top = torch.empty((len(prompt) - 1, self.top_k), dtype=torch.float64)
        for row, entries in enumerate(positions[1:]):
            if not isinstance(entries, dict):
                raise MissingPromptLogprobsError(
                    f"Teacher server {self.base_url}: `prompt_logprobs[{row + 1}]` is {entries!r}, not a map of token "
                    "id to {logprob, rank}."
                )
            try:
                ranked = sorted((int(e["rank"]), -float(e["logprob"]), int(t)) for t, e in entries.items())
            except (KeyError, TypeError, ValueError) as error:
                raise MissingPromptLogprobsError(
                    f"Teacher server {self.base_url}: `prompt_logprobs[{row + 1}]` entries need `logprob` and `rank` "
                    f"({type(error).__name__}: {error})."
                ) from None
            ranked = [entry for entry in ranked if entry[0] <= self.top_k][: self.top_k]
            if len(ranked) < self.top_k:
                raise ServedTeacherError(
                    f"Teacher server {self.base_url}: {len(ranked)} entries of rank <= {self.top_k} at prompt "
                    f"position {row + 1}, {self.top_k} asked. Start vLLM with `--max-logprobs {self.top_k}` or more."
                )
            ids[row] = torch.tensor([entry[2] for entry in ranked])
            top[row] = torch.tensor([-entry[1] for entry in ranked], dtype=torch.float64)
        return TopKTargets(ids, self._with_other(top.clamp_min(_MIN_LOG_PROB)))

    def _with_other(self, top: torch.Tensor) -> torch.Tensor:
        """Append the "other" bucket `log(1 - sum exp(top))` (float64, stable), refusing top-k sums above 1."""
        total = torch.logsumexp(top, dim=-1)
        worst = float(total.max()) if total.numel() else -math.inf
        if worst > math.log1p(self.normalization_tolerance):
            raise UnnormalizedLogProbsError(
                f"Teacher server {self.base_url}: the top-{self.top_k} probabilities of a position sum to "
                f"{math.exp(worst):.6f} > 1 + {self.normalization_tolerance}: its `prompt_logprobs` are not "
                "normalized log-probabilities (vLLM's default `--logprobs-mode raw_logprobs` returns them; logits "
                "or processed scores cannot give the 'other' bucket)."
            )
        other = torch.log(-torch.expm1(total.clamp_max(0.0))).clamp_min(_MIN_LOG_PROB)
        return torch.cat([top, other[:, None]], dim=-1).float()

    def score(self, prompts: list[list[int]], *, on_done: Callable[[int], None] | None = None) -> list[TopKTargets]:
        """Targets of every position of every row (row `i` of a result predicts token `i + 1`), in order.

        Rows go out `prompts_per_request` at a time, `max_concurrency` requests in flight; `on_done(n)` is called as
        each request's `n` rows come back.
        """
        groups = [prompts[i : i + self.prompts_per_request] for i in range(0, len(prompts), self.prompts_per_request)]

        def run(group):
            result = self._score_request(group)
            if on_done is not None:
                on_done(len(group))
            return result

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return [targets for result in pool.map(run, groups) for targets in result]

    def targets(self, inputs: dict[str, torch.Tensor], top_k: int | None = None) -> TopKTargets:
        """Live scoring: a collated batch's targets aligned with `labels[:, 1:]`, as [`TeacherStore.targets`] gives.

        Returns `TopKTargets` with `ids` `(B, T - 1, top_k)` and `log_probs` `(B, T - 1, top_k + 1)`; positions whose
        shifted label is -100 hold zeros. `top_k` (default the client's k) may be smaller: the tail is folded exactly.
        """
        top_k = self.top_k if top_k is None else top_k
        labels, mask = inputs["labels"], inputs["attention_mask"].bool()
        in_loss = labels[:, 1:] != -100
        rows = [row_ids[row_mask].tolist() for row_ids, row_mask in zip(inputs["input_ids"], mask)]
        picked = []
        for row, (targets, row_mask) in enumerate(zip(self.score(rows), mask)):
            # Unpadded position i predicts token i + 1; keep the positions in the loss, in order.
            keep = (labels[row][row_mask][1:] != -100).cpu()
            picked.append(TopKTargets(targets.ids[keep], targets.log_probs[keep]))
        joined = TopKTargets(torch.cat([t.ids for t in picked]), torch.cat([t.log_probs for t in picked]))
        flat = codec.fold(joined, top_k)
        ids = labels.new_zeros((*in_loss.shape, top_k))
        log_probs = torch.zeros((*in_loss.shape, top_k + 1), dtype=torch.float32, device=labels.device)
        ids[in_loss] = flat.ids.to(labels.device)
        log_probs[in_loss] = flat.log_probs.to(labels.device)
        return TopKTargets(ids, log_probs)


def _tokenization_model(tokenizer):
    """A one-layer placeholder model for the student's tokenizer: TRL's `SFTTrainer` needs a model to prepare the
    dataset and collate, although the served teacher does the scoring."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def cache_teacher_served(
    teacher_url: str,
    train_dataset,
    *,
    args,
    processing_class,
    eval_dataset=None,
    teacher_model: str | None = None,
    rows_per_shard: int = 1024,
    progress: bool = True,
    **client_kwargs,
) -> dict:
    r"""Write the offline store of `args.teacher_cache` from a served teacher: [`cache_teacher`] without loading it.

    The rows are tokenized and collated by TRL's `SFTTrainer` with `args`, as in [`cache_teacher`]; each shard's rows
    are scored by the server (see [`ServedTeacher`]), encoded and written the same way, so training reads the store
    exactly like one written in-process. Resumable: an interrupted run re-run with the same settings continues at the
    first unrecorded shard (transport settings, `prompts_per_request`, `max_concurrency`, `timeout`, `max_retries`,
    may change; the manifest keeps the first run's). The manifest's `teacher` names the server URL, the model name it
    reports and the request settings.

    Args:
        teacher_url (`str`): the vLLM server, e.g. `"http://10.0.0.5:8000"`.
        train_dataset, eval_dataset, args: as in [`cache_teacher`]; `args.kd_temperature` must be 1.0 unless the
            server applies the temperature.
        processing_class: the student's tokenizer (required: the teacher's is not loaded). It must give the teacher's
            token ids (a shared vocabulary), as `kd_top_k` training does.
        teacher_model (`str`, *optional*): the served model name; default the first the server reports.
        rows_per_shard (`int`): rows per shard file.
        progress (`bool`): show a progress bar.
        **client_kwargs: [`ServedTeacher`] settings (`prompts_per_request`, `max_concurrency`, `timeout`,
            `max_retries`, `backoff`, `server_applies_temperature`, `normalization_tolerance`, `api_key`).

    Returns:
        The manifest (`dict`).
    """
    from tqdm.auto import tqdm
    from trl import SFTTrainer

    from .cache import check_or_write_plan, finish_store, shard_record
    from .store import MANIFEST, PLAN, STORE_FORMAT, STORE_VERSION, shard_name

    store_dir, top_k = args.teacher_cache, args.kd_top_k
    if store_dir is None or top_k is None:
        raise ValueError(
            f"`cache_teacher_served` writes to `args.teacher_cache` the top `args.kd_top_k` entries; got "
            f"`teacher_cache={store_dir!r}`, `kd_top_k={top_k!r}`: set both."
        )
    if processing_class is None:
        raise ValueError("`processing_class` (the student's tokenizer) is required with a served teacher.")
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"`rows_per_shard` must be a positive integer, got {rows_per_shard!r}.")
    client = ServedTeacher(
        teacher_url, top_k=top_k, temperature=args.kd_temperature, model=teacher_model, **client_kwargs
    )
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    sft = SFTTrainer(
        model=_tokenization_model(tokenizer),
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )
    vocab_size = len(tokenizer)
    if not top_k < vocab_size:
        raise ValueError(f"`kd_top_k={top_k}` must be below the vocabulary size ({vocab_size}).")
    codec.log_prob_bits(vocab_size)
    splits = {"train": sft.train_dataset}
    if isinstance(sft.eval_dataset, dict):
        splits.update({f"eval_{name}": dataset for name, dataset in sft.eval_dataset.items()})
    elif sft.eval_dataset is not None:
        splits["eval"] = sft.eval_dataset
    shards = []
    for split, dataset in splits.items():
        for start in range(0, len(dataset), rows_per_shard):
            end = min(start + rows_per_shard, len(dataset))
            shards.append({"file": shard_name(len(shards)), "split": split, "start": start, "end": end})
    settings = client.settings()
    transport_keys = ("prompts_per_request", "max_concurrency", "timeout", "max_retries")
    transport = {key: settings.pop(key) for key in transport_keys}
    plan = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        # The keys of the in-process writer's `teacher` record, plus what the server says about itself; the weights are
        # not visible through the protocol.
        "teacher": {
            "name_or_path": settings["model_root"] or client.model,
            "revision": None,
            "dtype": None,
            "weights_sha256": None,
            "served": {**settings, "transport": transport},
        },
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        "top_k": top_k,
        "temperature": float(args.kd_temperature),
        "tokenization": tokenization_settings(sft),
        "encoding": {
            "entries": "int32 (positions, k + 1); see trl_distill/teachers/codec.py",
            "id_bits": codec.id_bits(vocab_size),
            "log_prob_bits": codec.log_prob_bits(vocab_size),
            "bytes_per_position": codec.bytes_per_position(top_k),
        },
        "splits": {split: {"rows": len(dataset)} for split, dataset in splits.items()},
        "rows_per_shard": rows_per_shard,
        "shards": shards,
    }
    os.makedirs(store_dir, exist_ok=True)
    _keep_first_transport(store_dir, plan, PLAN)
    check_or_write_plan(store_dir, plan)

    todo = [index for index in range(len(shards)) if shard_record(store_dir, shards[index]) is None]
    bar = tqdm(
        total=sum(shards[i]["end"] - shards[i]["start"] for i in todo),
        desc=f"Scoring with served teacher top-{top_k}",
        unit="row",
        disable=not progress,
    )
    for index in todo:
        shard = shards[index]
        dataset = splits[shard["split"]].select_columns(["input_ids", "labels"])
        batch = sft.data_collator([dataset[i] for i in range(shard["start"], shard["end"])])
        mask = batch["attention_mask"].bool()
        prompts = [ids[m].tolist() for ids, m in zip(batch["input_ids"], mask)]
        scored = client.score(prompts, on_done=bar.update)
        entries, counts = [], []
        for row, targets in enumerate(scored):
            keep = batch["labels"][row][mask[row]][1:] != -100  # unpadded position i predicts token i + 1
            largest = int(targets.ids[keep].max()) if keep.any() else 0
            if largest >= vocab_size:
                raise ServedTeacherError(
                    f"Teacher server {client.base_url} returned token id {largest}, outside the student's vocabulary "
                    f"of {vocab_size}: the served model's tokenizer is not the student's."
                )
            entries.append(codec.encode(TopKTargets(targets.ids[keep], targets.log_probs[keep]), vocab_size))
            counts.append(int(keep.sum()))
        record = write_shard(store_dir, index, batch_row_keys(batch), counts, torch.cat(entries))
        write_json(os.path.join(store_dir, record["file"].replace(".safetensors", ".json")), record)
    bar.close()
    manifest = finish_store(store_dir, plan)
    if manifest is None:  # only with another writer on the same directory
        raise ServedTeacherError(f"Teacher store {store_dir!r}: shards are missing after writing; see {MANIFEST}.")
    return manifest


def _keep_first_transport(store_dir: str, plan: dict, plan_name: str) -> None:
    """On resume, a change of transport settings alone (batching, concurrency, timeout, retries) is not a change of
    the store: keep the recorded ones, so the plan check compares what decides the targets."""
    path = os.path.join(store_dir, plan_name)
    if not os.path.isfile(path):
        return
    with open(path) as handle:
        existing = json.load(handle)
    recorded = existing.get("teacher", {}).get("served", {}).get("transport")
    if recorded is not None and recorded != plan["teacher"]["served"]["transport"]:
        logger.info("Teacher store %s: resuming with other transport settings (recorded: %s).", store_dir, recorded)
        plan["teacher"]["served"]["transport"] = recorded
