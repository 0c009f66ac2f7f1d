"""Train the tiny demo LLaVA on the `shapes` train split and save it with `save_pretrained`.

Usage: ``python -m vtc.train --data resources/datasets/shapes --out models/vtc-shapes-tiny``

Next-token training on the answer (plus end-of-sequence), everything else masked, with AdamW and a
cosine schedule. A training-only linear head on the projected visual tokens also predicts, for every
patch, the colour and shape of the object drawn there (or background): 576 labels per image instead of
one answer make the tiny vision tower learn in minutes on a CPU. The head is discarded; the saved model
is a plain `LlavaForConditionalGeneration`. Every `--eval-every` steps it reports greedy-decoding accuracy per question family on
the validation split, the same way the pipeline scores it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from vtc.benchmarks import read_common_parquet
from vtc.data import shapes
from vtc.models.tiny import build_model, build_processor

PATCH_CLASSES = 1 + len(shapes.COLORS) * len(shapes.SHAPES)


def alignment_loss(tokens: torch.Tensor, embeddings: torch.Tensor, metas: list[str], word_ids: dict) -> torch.Tensor:
    """Pulls each object patch's projected token towards the LLM embeddings of the words that name it.

    Like LLaVA's first (feature alignment) stage: visual tokens land where the words that describe them
    live. tokens: [B, N, D]; embeddings: [V, D].
    """
    logits = tokens @ embeddings.T  # [B, N, V]
    picked, targets = [], []
    for b, meta in enumerate(metas):
        for obj in json.loads(meta)["objects"]:
            names = [word_ids[obj["color"]], word_ids[obj["shape"]], word_ids[shapes.PLURALS[obj["shape"]]]]
            for patch in obj["patches"]:
                picked.append((b, patch))
                targets.append(names)
    rows, targets = torch.tensor(picked), torch.tensor(targets)
    log_probs = logits[rows[:, 0], rows[:, 1]].log_softmax(dim=-1)
    return -log_probs.gather(1, targets).mean()


def patch_labels(meta: str) -> torch.Tensor:
    """Per-patch class: 0 for background, else 1 + colour index × #shapes + shape index. Shape [576]."""
    labels = torch.zeros(shapes.GRID**2, dtype=torch.long)
    colors, kinds = list(shapes.COLORS), list(shapes.SHAPES)
    for obj in json.loads(meta)["objects"]:
        labels[obj["patches"]] = 1 + colors.index(obj["color"]) * len(kinds) + kinds.index(obj["shape"])
    return labels


def _conversation(questions: list[str], answers: list[str] | None = None) -> list[dict]:
    """One image, then one or more question/answer turns (LLaVA's multi-turn training format)."""
    messages = []
    for turn, question in enumerate(questions):
        content = [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": ([{"type": "image"}] if turn == 0 else []) + content})
        if answers is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answers[turn]}]})
    return messages


def answer_mask(input_ids: torch.Tensor, assistant_ids: list[int], eos_id: int) -> torch.Tensor:
    """True on the tokens after each "ASSISTANT:" up to and including the next end-of-sequence token."""
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    width = len(assistant_ids)
    for row, ids in enumerate(input_ids.tolist()):
        inside = False
        for position in range(len(ids)):
            if inside:
                mask[row, position] = True
                inside = ids[position] != eos_id
            elif ids[position - width + 1 : position + 1] == assistant_ids:
                inside = True
    return mask


def training_batch(processor, images: list, turns: list[list[tuple[str, str, list[int]]]]) -> dict[str, torch.Tensor]:
    """Right-padded multi-turn batch whose labels cover only the answers and their end tokens.

    turns: per image, (question, answer, target patches) of each turn.
    """
    texts = []
    for image_turns in turns:
        questions, answers, _ = zip(*image_turns)
        texts.append(processor.apply_chat_template(_conversation(list(questions), list(answers))))
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="right")
    tokenizer = processor.tokenizer
    assistant_ids = tokenizer("ASSISTANT:", add_special_tokens=False)["input_ids"]
    mask = answer_mask(batch["input_ids"], assistant_ids, tokenizer.eos_token_id) & batch["attention_mask"].bool()
    batch["labels"] = batch["input_ids"].masked_fill(~mask, -100)
    return batch


def grounding_loss(attentions, batch, turns, image_token_id: int, layers=(-2, -1)) -> torch.Tensor:
    """-log of the attention share that each answer's last prompt token puts on its target patches.

    The share is over the image tokens, averaged over heads, in each of `layers`. The testbed records
    which patches the objects a question names cover; telling the model where to look lets a model
    trained from scratch leave the "answer from priors" plateau in minutes rather than hours.
    attentions: per layer [B, heads, L, L].
    """
    starts = (batch["labels"][:, 1:] != -100) & (batch["labels"][:, :-1] == -100)  # answer starts, shifted by one
    rows, queries = [], []
    length = batch["input_ids"].shape[1]
    image_mask = batch["input_ids"] == image_token_id
    target_mask = torch.zeros(sum(len(t) for t in turns), length, dtype=torch.bool)
    for b, image_turns in enumerate(turns):
        image_positions = image_mask[b].nonzero().flatten()
        for (_, _, targets), query in zip(image_turns, starts[b].nonzero().flatten().tolist()):
            target_mask[len(rows), image_positions[targets]] = True
            rows.append(b)
            queries.append(query)
    rows, queries = torch.tensor(rows), torch.tensor(queries)
    target_mask = target_mask[: len(rows)]
    losses = []
    for layer in layers:
        # One gather per layer: indexing the [B, heads, L, L] tensor per query would make backward
        # scatter into a full-size zero tensor for every query.
        share = attentions[layer][rows, :, queries].mean(dim=1)  # [Q, L]
        on_target = (share * target_mask).sum(dim=-1)
        on_image = (share * image_mask[rows]).sum(dim=-1)
        losses.append(-torch.log(on_target / on_image + 1e-6))
    return torch.cat(losses).mean()


@torch.no_grad()
def evaluate_accuracy(model, processor, rows: list[dict], batch_size: int = 64) -> dict[str, float]:
    model.eval()
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [processor.apply_chat_template(_conversation([r["question"]]), add_generation_prompt=True) for r in chunk]
        batch = processor(
            images=[r["image"] for r in chunk], text=prompts, return_tensors="pt", padding=True, padding_side="left"
        )
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        answers = processor.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        for row, answer in zip(chunk, answers):
            hits[row["family"]].append(answer.strip() == row["answers"][0])
    model.train()
    scores = {family: sum(h) / len(h) for family, h in sorted(hits.items())}
    scores["overall"] = sum(sum(h) for h in hits.values()) / len(rows)
    return scores


def majority_baseline(train_rows, test_rows) -> dict[str, float]:
    """Accuracy of always answering each family's most frequent training answer."""
    majority = {}
    for family in {r["family"] for r in train_rows}:
        majority[family] = Counter(r["answers"][0] for r in train_rows if r["family"] == family).most_common(1)[0][0]
    hits = defaultdict(list)
    for r in test_rows:
        hits[r["family"]].append(r["answers"][0] == majority[r["family"]])
    scores = {family: sum(h) / len(h) for family, h in sorted(hits.items())}
    scores["overall"] = sum(sum(h) for h in hits.values()) / len(test_rows)
    return scores


def train(
    data_dir: Path,
    out_dir: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    eval_samples: int,
    max_turns: int = 4,
) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    splits = {split: read_common_parquet(data_dir / f"{split}.parquet") for split in ("train", "validation", "test")}
    columns = ["image", "question", "answers", "family"]
    train = splits["train"].select_columns(["image_id", "question", "answers", "meta"])
    # Eager attention in the language model: the grounding loss needs the attention weights.
    attn_implementation = "eager"
    rows_of_image: dict[str, list[int]] = defaultdict(list)
    for index, image_id in enumerate(train["image_id"]):
        rows_of_image[image_id].append(index)
    images = list(rows_of_image)
    validation_rows = list(splits["validation"].select_columns(columns))[:eval_samples]
    processor = build_processor()
    model = build_model(processor, seed=seed)
    model.model.language_model.set_attn_implementation(attn_implementation)
    model.train()
    names = (*shapes.COLORS, *shapes.SHAPES, *shapes.PLURALS.values())
    word_ids = {word: processor.tokenizer.convert_tokens_to_ids(word) for word in names}
    patch_head = torch.nn.Linear(model.config.text_config.hidden_size, PATCH_CLASSES)
    projected = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, out: projected.update(tokens=out))
    parameters = list(model.parameters()) + list(patch_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order: list[str] = []
    history = []
    started = time.time()
    progress = tqdm(range(1, steps + 1), desc="train", mininterval=10)
    for step in progress:
        if len(order) < batch_size:
            order += rng.sample(images, len(images))
        chosen, order = order[:batch_size], order[batch_size:]
        turns, metas, pictures = [], [], []
        for image_id in chosen:
            rows = train.select(rows_of_image[image_id])
            pairs = [(q, a[0], json.loads(m)["target_patches"]) for q, a, m in zip(rows["question"], rows["answers"], rows["meta"])]
            turns.append(rng.sample(pairs, min(len(pairs), max_turns)))
            metas.append(rows[0]["meta"])
            pictures.append(splits["train"][rows_of_image[image_id][0]]["image"])
        batch = training_batch(processor, pictures, turns)
        output = model(**batch, output_attentions=True)
        loss = output.loss
        ground_loss = grounding_loss(output.attentions, batch, turns, model.config.image_token_id)
        tokens = projected["tokens"]
        patch_loss = torch.nn.functional.cross_entropy(
            patch_head(tokens).flatten(0, 1), torch.stack([patch_labels(m) for m in metas]).flatten()
        )
        align_loss = alignment_loss(tokens, model.get_input_embeddings().weight, metas, word_ids)
        (loss + patch_loss + align_loss + ground_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(
            loss=f"{loss.item():.3f}", patch=f"{patch_loss.item():.3f}", align=f"{align_loss.item():.3f}", ground=f"{ground_loss.item():.3f}"
        )
        if step % eval_every == 0 or step == steps:
            scores = evaluate_accuracy(model, processor, validation_rows)
            history.append({"step": step, "loss": loss.item(), "minutes": (time.time() - started) / 60, **scores})
            print(json.dumps(history[-1]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.model.language_model.set_attn_implementation("sdpa")
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    test_rows = list(splits["test"].select_columns(columns))
    report = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_minutes": (time.time() - started) / 60,
        "test_accuracy": evaluate_accuracy(model, processor, test_rows),
        "test_majority_baseline": majority_baseline(list(splits["train"].select_columns(["answers", "family"])), test_rows),
        "history": history,
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=256)
    parser.add_argument("--max-turns", type=int, default=4, help="questions per image in one training sequence")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args.data, args.out, args.steps, args.batch_size, args.lr, args.seed, args.eval_every, args.eval_samples, args.max_turns)


if __name__ == "__main__":
    main()
