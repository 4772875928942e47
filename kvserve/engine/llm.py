"""The offline API: ``LLM(...).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from kvserve.config import EngineConfig
from kvserve.engine.engine import Engine
from kvserve.engine.output import RequestOutput
from kvserve.model.loader import Checkpoint
from kvserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | Checkpoint | None = None, *,
                 config: EngineConfig | None = None, **kwargs: Any) -> None:
        """``model``: a .gguf file, a Hugging Face directory, a loaded Checkpoint, or None for
        the default SmolLM2-135M-Instruct. The keywords are EngineConfig's fields
        (``dtype="bfloat16"``, ``kv_cache_memory="512MiB"``, ...); or pass ``config``."""
        checkpoint = model if isinstance(model, Checkpoint) else None
        if config is None:
            if model is not None and checkpoint is None:
                kwargs["model"] = model
            try:
                config = EngineConfig(**kwargs)
            except TypeError as exc:
                names = ", ".join(EngineConfig.__dataclass_fields__)
                raise TypeError(f"{exc}; LLM takes the keywords {names}") from None
        elif kwargs:
            raise TypeError("give either config or keywords, not both")
        self.engine = Engine(config, checkpoint)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. A string or one list of ids is a single prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        many = not isinstance(params, SamplingParams)
        params_list = list(params) if many else [params] * len(prompts)  # type: ignore[arg-type]
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        token_ids = [self._ids(p) for p in prompts]
        for ids, sp in zip(token_ids, params_list):  # validate all before queueing any
            self.engine.check_fits(ids, sp)
        request_ids = [
            self.engine.add_request(ids, sp, prompt_text=p if isinstance(p, str) else None)
            .request_id for p, ids, sp in zip(prompts, token_ids, params_list)]
        show = use_tqdm if use_tqdm is not None else len(prompts) >= 8
        done = {o.request_id: o for o in self._run(len(request_ids), show) if o.finished}
        return [done[i] for i in request_ids]

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | None = None,
             use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stream(self, prompt: Prompt, params: SamplingParams) -> Iterator[RequestOutput]:
        """Yield this request's output after every token (``delta`` holds the new text)."""
        request = self.engine.add_request(prompt, params)
        while True:
            for out in self.engine.step():
                if out.request_id == request.request_id:
                    yield out
                    if out.finished:
                        return

    def _run(self, total: int, show_progress: bool) -> Iterator[RequestOutput]:
        from rich.progress import Progress

        with Progress(disable=not show_progress, transient=True) as progress:
            task = progress.add_task("generating", total=total)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        progress.advance(task)
                    yield out

    def _ids(self, prompt: Prompt) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def stats(self) -> dict:
        """Work counted by the scheduler, and KV pool usage."""
        return self.engine.stats().as_dict()

    def cache_stats(self) -> dict:
        """Prefix-cache queries, hits and tokens saved, and blocks and bytes per tier."""
        return self.engine.cache_stats()

    def clear_cache(self) -> int:
        """Drop every unreferenced cached block in every tier; returns how many."""
        return self.engine.clear_cache()

    def close(self) -> None:
        """Write the disk tier's queued blocks (also done on leaving a ``with`` block)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
