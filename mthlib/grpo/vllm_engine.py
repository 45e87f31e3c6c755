"""A vLLM rollout engine kept in step with the trainer by sparse weight syncs (needs the ``vllm`` extra and a GPU).

vLLM holds its own copy of the model. Before each rollout, :meth:`VLLMEngine.load_weights`
ships what changed since the last one: for a masked run only the active entries' values
(:mod:`mthlib.weight_sync`, ~1% of a dense sync at 99% sparsity; the indices once per mask), for
a dense run every weight. Each vLLM worker applies a sparse update through the
:class:`~mthlib.weight_sync.SparseUpdateReceiver` extension, so the engine's weights equal the
trainer's bitwise after every sync.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mthlib.grpo.engines import Continuation, RolloutEngine, SamplingConfig
from mthlib.masking import SparseState
from mthlib.models import resolve_model_path
from mthlib.weight_sync import SparseWeightSync, fused_layout

RECEIVER = "mthlib.weight_sync.SparseUpdateReceiver"


class VLLMEngine(RolloutEngine):
    """Samples with a ``vllm.LLM`` whose weights follow the trainer's.

    Args:
        llm: A ``vllm.LLM`` started with ``worker_extension_cls="mthlib.weight_sync.SparseUpdateReceiver"``
            (anything with vLLM's ``generate`` and ``collective_rpc`` works); ``None``: started on
            first use from ``model`` with ``llm_options``.
        model: The model vLLM loads when it starts the engine itself (``"embedded"``, a Hub id or a local folder).
        seed: Seed of vLLM's sampling.
        llm_options: More keyword arguments of ``vllm.LLM`` (``gpu_memory_utilization``,
            ``tensor_parallel_size=1``, ``enable_prefix_caching``...).
    """

    def __init__(self, llm: Any = None, model: str | None = None, seed: int = 0, **llm_options: Any) -> None:
        if llm is None and model is None:
            raise ValueError("VLLMEngine needs a started vllm.LLM (llm=...) or the model to start one with (model=...)")
        self.llm = llm
        self.model_name = model
        self.seed = seed
        self.llm_options = llm_options
        self.sync: SparseWeightSync | None = None
        self.bytes_sent = 0

    def _started(self) -> Any:
        if self.llm is None:
            try:
                from vllm import LLM
            except ImportError:
                raise ImportError("rollout_engine 'vllm' needs vLLM: pip install -e \".[vllm]\" (on a GPU machine)") from None
            self.llm = LLM(model=resolve_model_path(self.model_name), seed=self.seed, worker_extension_cls=RECEIVER, **self.llm_options)
        return self.llm

    def load_weights(self, model: PreTrainedModel, state: SparseState | None) -> None:
        """Make vLLM's weights equal ``model``'s: the active entries of ``state``, or every weight without one."""
        llm = self._started()
        if state is None:
            weights = [(name, param.detach()) for name, param in model.named_parameters()]
            llm.collective_rpc("load_dense_weights", args=(weights,))
            self.bytes_sent += sum(t.numel() * t.element_size() for _, t in weights)
            return
        if self.sync is None or self.sync.state is not state:
            self.sync = SparseWeightSync(state, layout=fused_layout(model))
        update = self.sync.update()
        llm.collective_rpc("apply_sparse_update", args=(update,))
        self.bytes_sent += update.nbytes

    def sampling_params_class(self) -> type:
        """``vllm.SamplingParams`` (a fake engine's tests give their own)."""
        from vllm import SamplingParams

        return SamplingParams

    def sample_turn(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, contexts: list[list[int]],
                    sampling: SamplingConfig) -> list[Continuation]:
        params = self.sampling_params_class()(
            n=1, max_tokens=sampling.max_completion_length, temperature=0.0 if sampling.greedy else sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else -1, top_p=sampling.top_p,
            stop=list(sampling.stop_strings) or None, stop_token_ids=[tokenizer.eos_token_id],
        )
        outputs = self._started().generate([{"prompt_token_ids": context} for context in contexts], params, use_tqdm=False)
        results = []
        for output in outputs:
            sample = output.outputs[0]
            tokens = list(sample.token_ids)
            results.append((tokens, sample.finish_reason == "length"))
        return results
