"""Batched `generate` with transformers: the CPU fallback, and the exact-entropy engine."""

from __future__ import annotations

from typing import Sequence

from raypost.config import EngineConfig, SamplingConfig
from raypost.engines.base import Completion, Request, TokenLogprob, entropy_from_logits
from raypost.engines.chat import render_prompt


class TransformersEngine:
    backend = "transformers"

    def __init__(self, model_path: str, config: EngineConfig, model_name: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = model_name or str(model_path)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        # Decoder-only models generate from the right edge of the prompt.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        from raypost.runtime import cpu_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        requested = config.dtype if device == "cuda" else cpu_dtype(config.dtype)
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            requested, None
        )
        self.device = device
        if device == "cpu" and config.cpu_threads:
            # Ray pins OMP_NUM_THREADS to the actor's CPUs; on one machine with one model actor
            # at a time, the forward passes may use every core.
            torch.set_num_threads(config.cpu_threads)
        self.hf_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype or "auto").to(device).eval()
        self.max_model_len = config.max_model_len or getattr(self.hf_model.config, "max_position_embeddings", 2048)

    def generate(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        results: list[list[Completion]] = []
        step = self.config.batch_size
        for start in range(0, len(requests), step):
            results.extend(self._generate_batch(requests[start : start + step], sampling))
        return results

    def _generate_batch(self, requests: Sequence[Request], sampling: SamplingConfig) -> list[list[Completion]]:
        import torch

        texts = [render_prompt(self.tokenizer, r.messages) for r in requests]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
        width = encoded["input_ids"].shape[1]
        max_new = max(1, min(sampling.max_tokens, self.max_model_len - width))
        want_scores = sampling.logprobs is not None or sampling.first_token_entropy or sampling.token_entropies
        kwargs = dict(
            max_new_tokens=max_new,
            num_return_sequences=sampling.n,
            pad_token_id=self.tokenizer.pad_token_id,
            output_scores=want_scores,
            output_logits=want_scores,
            return_dict_in_generate=True,
        )
        kwargs.update(self.sampling_kwargs(sampling))
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.inference_mode():
            output = self.hf_model.generate(**encoded, **kwargs)
        sequences = output.sequences[:, width:]
        eos_ids = self._eos_ids()
        results: list[list[Completion]] = []
        for i in range(len(requests)):
            samples = []
            for j in range(sampling.n):
                row = i * sampling.n + j
                tokens = sequences[row].tolist()
                length, finish = self._cut(tokens, eos_ids, max_new)
                text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
                finish = self._apply_stop(text, sampling.stop, finish)
                text = self._truncate_at_stop(text, sampling.stop)
                completion = Completion(
                    text=text,
                    completion_tokens=length,
                    prompt_tokens=int(prompt_lengths[i]),
                    finish_reason=finish,
                )
                if want_scores:
                    logits = [step[row] for step in output.logits[: max(length, 1)]]
                    if sampling.first_token_entropy:
                        completion.first_token_entropy = entropy_from_logits(logits[0])
                    if sampling.token_entropies:
                        completion.token_entropies = [entropy_from_logits(step) for step in logits[:length]]
                    if sampling.logprobs is not None:
                        completion.logprobs = self._token_logprobs(tokens[:length], logits, sampling.logprobs)
                samples.append(completion)
            results.append(samples)
        return results

    def sampling_kwargs(self, sampling: SamplingConfig) -> dict:
        """`generate` arguments for a sampling config: greedy at temperature 0, stop strings."""
        if sampling.temperature > 0:
            kwargs = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        if sampling.stop:
            kwargs.update(stop_strings=sampling.stop, tokenizer=self.tokenizer)
        return kwargs

    def _eos_ids(self) -> set[int]:
        ids = self.hf_model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        ids = {i for i in ids if i is not None}
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _cut(self, tokens: list[int], eos_ids: set[int], max_new: int) -> tuple[int, str]:
        for position, token in enumerate(tokens):
            if token in eos_ids:
                return position, "stop"
        return len(tokens), "length" if len(tokens) >= max_new else "stop"

    @staticmethod
    def _apply_stop(text: str, stop: list[str], finish: str) -> str:
        return "stop" if any(s in text for s in stop) else finish

    @staticmethod
    def _truncate_at_stop(text: str, stop: list[str]) -> str:
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        return text if cut < 0 else text[:cut]

    def _token_logprobs(self, tokens: list[int], logits, k: int) -> list[TokenLogprob]:
        import torch

        result = []
        for token, step_logits in zip(tokens, logits):
            log_probs = torch.log_softmax(step_logits.float(), dim=-1)
            top = torch.topk(log_probs, k) if k > 0 else None
            result.append(
                TokenLogprob(
                    token=self.tokenizer.decode([token]),
                    logprob=float(log_probs[token]),
                    top=[] if top is None else [
                        (self.tokenizer.decode([int(t)]), float(v)) for v, t in zip(top.values, top.indices)
                    ],
                )
            )
        return result

    def load_weights(self, model_path: str) -> None:
        """New weights of the same architecture, in place: no new process, no new tokenizer
        (the closed loop syncs each round's trained student this way)."""
        import torch
        from transformers import AutoModelForCausalLM

        fresh = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.hf_model.dtype)
        with torch.no_grad():
            missing, unexpected = self.hf_model.load_state_dict(fresh.state_dict(), strict=False)
        if unexpected or any("lm_head" not in name for name in missing):
            raise ValueError(f"{model_path}: weights do not fit the running model "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        self.hf_model.eval()

    def next_token_logprobs(self, text: str, token_ids: Sequence[int]) -> list[float]:
        """Log-probabilities of `token_ids` as the token after raw `text` (multiple-choice letters)."""
        import torch

        encoded = self.tokenizer(text, return_tensors="pt", add_special_tokens=True).to(self.device)
        with torch.inference_mode():
            logits = self.hf_model(**encoded).logits[0, -1].float()
        return torch.log_softmax(logits, dim=-1)[list(token_ids)].tolist()

    def answer_losses(self, requests: Sequence[Request], answers: Sequence[str]) -> list[tuple[float, float]]:
        """(mean, summed) token loss of each given answer as the assistant's turn after the prompt
        (the closed loop's uncertainty, selection's perplexity)."""
        import torch

        out = []
        for request, answer in zip(requests, answers):
            prompt = render_prompt(self.tokenizer, request.messages)
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"][: self.max_model_len - len(prompt_ids)]
            if not answer_ids:
                out.append((0.0, 0.0))
                continue
            ids = torch.tensor([prompt_ids + answer_ids], device=self.device)
            with torch.inference_mode():
                logits = self.hf_model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
            losses = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids):], reduction="none")
            out.append((float(losses.mean()), float(losses.sum())))
        return out

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        from raypost.engines.chat import count_prompt_tokens

        return count_prompt_tokens(self.tokenizer, messages)

    def close(self) -> None:
        self.hf_model = None
