"""Rollouts: batched sampling of every completion at once, and log-probs of sampled tokens in chunks.

A rollout row is one conversation: the prompt, then for every turn the sampled
assistant tokens (which carry loss) and the scripted user turn that follows them
(which does not). Log-probabilities are computed only at loss tokens, a chunk of
tokens at a time with activation checkpointing, so full-vocabulary logits for the
whole batch are never held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mthlib.envs.base import Episode
from mthlib.grpo.engines import HFEngine, RolloutEngine, SamplingConfig
from mthlib.grpo.padding import attention_rows, pad_rows
from mthlib.grpo.prefix_tree import pack_prefix_trees, scores_per_token
from mthlib.grpo.token_scores import token_scores
from mthlib.grpo.tree_attention import supports_tree_attention, tree_hidden_states

PACKABLE_ATTENTION = ("sdpa", "eager")  # attention implementations that take a 4-D mask as given


@dataclass
class Rollout:
    """Sampled conversations, right-padded into tensors.

    Attributes:
        input_ids: ``(N, T)`` token ids.
        attention_mask: ``(N, T)`` 1 on real tokens.
        loss_mask: ``(N, T)`` 1 on sampled assistant tokens.
        replies: Per row, the decoded assistant reply of every turn.
        truncated: ``(N,)`` True when a turn hit ``max_completion_length`` without an end token.
        completion_lengths: ``(N,)`` sampled tokens per row, over all turns.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    replies: list[list[str]]
    truncated: torch.Tensor
    completion_lengths: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> Rollout:
        """The same rollout with its tensors on ``device``."""
        return replace(
            self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device), truncated=self.truncated.to(device),
        )

    def select(self, rows: slice) -> Rollout:
        """Rows ``rows`` with padding columns that no selected row uses dropped."""
        used = int(self.attention_mask[rows].sum(dim=1).max())
        return Rollout(
            self.input_ids[rows, :used],
            self.attention_mask[rows, :used],
            self.loss_mask[rows, :used],
            self.replies[rows],
            self.truncated[rows],
            self.completion_lengths[rows],
        )


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def next_turn_tokens(tokenizer: PreTrainedTokenizerBase, episode: Episode, replies: list[str]) -> list[int]:
    """Tokens that follow the last sampled reply: the end of that turn, the next user turn, the assistant header.

    The chat template is rendered with and without the next user turn; the text after
    the end-of-turn token (which the model sampled itself) up to the new assistant
    header is what gets appended, so the training sequence is exactly what the model saw.
    """
    conversation = episode.messages(replies)
    before = _render(tokenizer, conversation[:-1], generation_prompt=False)
    after = _render(tokenizer, conversation, generation_prompt=True)
    eos = tokenizer.eos_token or ""
    end = before.rfind(eos) + len(eos) if eos and eos in before else len(before)
    if not after.startswith(before[:end]):
        raise ValueError("the chat template does not render the conversation as a prefix of its continuation")
    return tokenizer(after[end:], add_special_tokens=False)["input_ids"]


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, episode: Episode) -> list[int]:
    """Tokens of the first user turn, rendered with the chat template and an assistant header."""
    text = _render(tokenizer, episode.messages(), generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    episodes: list[Episode],
    sampling: SamplingConfig,
    engine: RolloutEngine | None = None,
) -> Rollout:
    """Sample one conversation per episode (repeat an episode G times for G completions).

    ``engine`` continues the contexts turn by turn (default: Hugging Face ``generate``).

    Every turn is one batched generation over the rows still in conversation; a row whose
    episode has more turns gets the next scripted user turn appended after its reply.
    """
    engine = engine if engine is not None else HFEngine()
    was_training = model.training
    model.eval()
    tokens = [prompt_tokens(tokenizer, ep) for ep in episodes]
    loss = [[0] * len(t) for t in tokens]
    replies: list[list[str]] = [[] for _ in episodes]
    truncated = [False] * len(episodes)
    for turn in range(max(ep.num_turns for ep in episodes)):
        active = [i for i, ep in enumerate(episodes) if ep.num_turns > turn]
        if turn > 0:
            for i in active:
                if truncated[i]:
                    tokens[i].append(tokenizer.eos_token_id)
                    loss[i].append(0)
                follow = next_turn_tokens(tokenizer, episodes[i], replies[i])
                tokens[i] += follow
                loss[i] += [0] * len(follow)
        sampled = engine.sample_turn(model, tokenizer, [tokens[i] for i in active], sampling)
        for i, (new, cut) in zip(active, sampled):
            tokens[i] += new
            loss[i] += [1] * len(new)
            replies[i].append(tokenizer.decode(new, skip_special_tokens=True))
            truncated[i] = cut
    model.train(was_training)
    loss_mask = pad_rows(loss, 0)
    return Rollout(
        pad_rows(tokens, tokenizer.pad_token_id), attention_rows(tokens), loss_mask, replies,
        torch.tensor(truncated), loss_mask.sum(dim=1),
    )


def _chunk_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return token_scores(head(hidden), targets, temperature)


def _decoder_states(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, wanted: torch.Tensor,
    pack_prefixes: bool,
) -> torch.Tensor:
    """Final hidden states at the positions under ``wanted`` ``(N, T)``, from rows or from packed prefix trees."""
    packable = model.config._attn_implementation in PACKABLE_ATTENTION
    if not (pack_prefixes and packable):
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hidden[wanted]
    trees = pack_prefix_trees(input_ids, attention_mask, scores_per_token(model))
    if supports_tree_attention(model):  # attention only where the trees allow it
        return trees.gather(tree_hidden_states(model, trees), wanted)
    mask = trees.attention_mask
    if model.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill_(
            ~mask, torch.finfo(model.dtype).min)
    hidden = model.base_model(
        input_ids=trees.input_ids, attention_mask=mask, position_ids=trees.position_ids, use_cache=False
    ).last_hidden_state
    return trees.gather(hidden, wanted)


def token_logprobs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    pack_prefixes: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities and entropies of the tokens under ``loss_mask``.

    The decoder runs once; the output projection runs on loss tokens only, ``chunk_size``
    tokens at a time, each chunk recomputed in backward (activation checkpointing), so
    memory holds one chunk of vocabulary logits instead of ``N * T`` of them.

    Args:
        input_ids: ``(N, T)`` right-padded sequences.
        attention_mask: ``(N, T)``.
        loss_mask: ``(N, T)`` 1 at tokens whose log-probability is wanted.
        temperature: Logits are divided by it, as when sampling.
        chunk_size: Tokens per output-projection chunk.
        pack_prefixes: Run the decoder on the rows packed into prefix trees
            (:mod:`mthlib.grpo.prefix_tree`): a prefix that rows share, such as the prompt of a
            group's completions, is computed once. The values equal the unpacked ones up to
            floating-point rounding. Llama and Qwen2 decoders with ``sdpa`` attention compute it
            only where the trees allow (:mod:`mthlib.grpo.tree_attention`); models whose attention
            takes no 4-D mask (other than ``sdpa`` and ``eager``) run unpacked.

    Returns:
        ``(N, T)`` log-probabilities and ``(N, T)`` entropies (detached), 0 outside ``loss_mask``.
    """
    wanted = loss_mask[:, 1:].bool()
    predicting = F.pad(wanted, (0, 1))  # the positions whose next token carries loss
    states = _decoder_states(model, input_ids, attention_mask, predicting, pack_prefixes)
    targets = input_ids[:, 1:][wanted]
    head = model.get_output_embeddings()  # the module, so a masked head computes its active entries' gradient only
    pieces, entropies = [], []
    for start in range(0, states.shape[0], chunk_size):
        args = (states[start:start + chunk_size], head, targets[start:start + chunk_size], temperature)
        if torch.is_grad_enabled():
            picked, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            picked, entropy = _chunk_logprobs(*args)
        pieces.append(picked)
        entropies.append(entropy)
    shape = (input_ids.shape[0], input_ids.shape[1] - 1)
    logps = torch.zeros(shape, dtype=torch.float32, device=input_ids.device)
    ent = torch.zeros_like(logps)
    if pieces:
        logps = logps.masked_scatter(wanted, torch.cat(pieces))
        ent = ent.masked_scatter(wanted, torch.cat(entropies))
    return F.pad(logps, (1, 0)), F.pad(ent, (1, 0))


@torch.no_grad()
def rollout_logprobs(
    model: PreTrainedModel, rollout: Rollout, micro_batch_size: int, temperature: float = 1.0, chunk_size: int = 1024,
    pack_prefixes: bool = False,
) -> torch.Tensor:
    """``(N, T)`` log-probabilities of the sampled tokens of the whole rollout, without gradients.

    Computed ``micro_batch_size`` rows at a time (each padded back to the rollout's width);
    e.g. the sampling policy's log-probabilities for ``num_iterations > 1``, or a reference's.
    ``pack_prefixes`` as in :func:`token_logprobs`.
    """
    parts = []
    width = rollout.input_ids.shape[1]
    for first in range(0, len(rollout), micro_batch_size):
        part = rollout.select(slice(first, first + micro_batch_size))
        logps, _ = token_logprobs(
            model, part.input_ids, part.attention_mask, part.loss_mask, temperature, chunk_size, pack_prefixes
        )
        parts.append(F.pad(logps, (0, width - logps.shape[1])))
    return torch.cat(parts)
