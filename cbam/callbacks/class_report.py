"""Per-class test accuracy and the confusion matrix, at the end of every test (after training, or with
``train=false ckpt_path=...``).

Rank 0 prints ``test/acc`` and a per-class table (past ``print_up_to`` classes, the lowest and highest
accuracies only, with a pointer to the CSV), writes every class to ``<run dir>/per_class_accuracy.csv`` and
draws the confusion matrix to ``<run dir>/confusion_matrix.png`` (counts in the cells up to
``annotate_up_to`` classes); with a TensorBoard logger the figure is logged as ``test/confusion_matrix`` and
the whole table as text ``test/per_class_accuracy``.
"""

from __future__ import annotations

import csv
import io

import pytorch_lightning as pl
import torch
from torchmetrics.classification import MulticlassConfusionMatrix

from cbam.arguments import check_integer
from cbam.callbacks._utils import class_names, new_figure, publish_figure, tensorboard_writers
from cbam.data import IGNORED_LABEL
from cbam.runtime.atomic import write_atomically
from cbam.training.run_files import CLASS_TABLE, CONFUSION_FIGURE, run_dir


def per_class_rows(matrix: torch.Tensor, names: list[str]) -> list[dict]:
    """One row per class of a confusion matrix (rows: true class): correct, total and accuracy (None when
    the class has no test image)."""
    rows = []
    for index, name in enumerate(names):
        correct, total = int(matrix[index, index]), int(matrix[index].sum())
        rows.append(
            {
                "class": name,
                "index": index,
                "correct": correct,
                "total": total,
                "accuracy": correct / total if total else None,
            }
        )
    return rows


def format_table(rows: list[dict], print_up_to: int | None = None, csv_path: str | None = None) -> str:
    """The table as text: every class, or past ``print_up_to`` classes the ``print_up_to // 2`` lowest and
    highest accuracies (classes without test images last), then a pointer to ``csv_path`` for the rest."""
    shown: list[dict | None] = list(rows)
    if print_up_to is not None and len(rows) > print_up_to:
        ranked = sorted(rows, key=lambda row: (row["accuracy"] is None, row["accuracy"] or 0.0, row["index"]))
        half = print_up_to // 2
        shown = [*ranked[:half], None, *ranked[-half:]]
    width = max([len("class"), *(len(row["class"]) for row in rows)])
    lines = [f"{'class':<{width}}  {'correct':>7}  {'total':>6}  {'accuracy':>8}"]
    for row in shown:
        if row is None:
            where = f" (all in {csv_path})" if csv_path else ""
            lines.append(f"... {len(rows) - len(shown) + 1} classes between the lowest and highest{where}")
            continue
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        lines.append(f"{row['class']:<{width}}  {row['correct']:>7}  {row['total']:>6}  {accuracy:>8}")
    correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
    lines.append(f"{'all':<{width}}  {correct:>7}  {total:>6}  {correct / max(total, 1):>8.2%}")
    return "\n".join(lines)


class ClassReport(pl.Callback):
    """Per-class accuracy table (printed, CSV, TensorBoard text) and confusion-matrix figure of the test set.

    Args:
        annotate_up_to: write the counts in the cells when there are at most this many classes.
        print_up_to: print every class's row when there are at most this many classes, else the lowest and
            highest ``print_up_to // 2`` (the CSV and TensorBoard hold all).
    """

    def __init__(
        self,
        annotate_up_to: int = 20,
        print_up_to: int = 20,
    ) -> None:
        check_integer("annotate_up_to", annotate_up_to, 0)
        check_integer("print_up_to", print_up_to, 2)
        self.annotate_up_to, self.print_up_to = annotate_up_to, print_up_to
        self._matrix: MulticlassConfusionMatrix | None = None
        self._logits: torch.Tensor | None = None
        self._hook = None

    # The module's test_step returns nothing: a forward hook on the LightningModule hands over its logits.
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._matrix, self._logits = None, None

        def keep_logits(module, args, output):
            self._logits = output if isinstance(output, torch.Tensor) else None

        self._hook = pl_module.register_forward_hook(keep_logits)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        logits = outputs if isinstance(outputs, torch.Tensor) and outputs.ndim == 2 else self._logits
        self._logits = None
        labels = batch[1]
        if logits is None or logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
            return
        if self._matrix is None:
            num_classes = int(getattr(pl_module, "num_classes", 0) or logits.shape[1])
            # without the rows that fill up a short batch
            matrix = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORED_LABEL)
            self._matrix = matrix.to(logits.device)
        self._matrix.update(logits.detach().argmax(dim=1), labels)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._matrix is None:
            return
        matrix = self._matrix.compute().cpu()  # summed over ranks: every rank must call it
        if not trainer.is_global_zero:
            return
        names = class_names(trainer, matrix.shape[0])
        rows = per_class_rows(matrix, names)
        correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
        folder = run_dir(trainer)
        print(f"\ntest/acc = {correct / max(total, 1):.4f} ({correct}/{total} test images)")
        table = format_table(rows, self.print_up_to, str(folder / CLASS_TABLE))
        print("Per-class test accuracy:\n" + table + "\n", flush=True)
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["class", "index", "correct", "total", "accuracy"])
        writer.writeheader()
        for row in rows:
            accuracy = "" if row["accuracy"] is None else f"{row['accuracy']:.6f}"
            writer.writerow({**row, "accuracy": accuracy})
        write_atomically(
            folder / CLASS_TABLE, lambda file: file.write(text.getvalue().encode()), prefix=f".{CLASS_TABLE}."
        )
        figure = self._figure(matrix, names)
        publish_figure(trainer, figure, folder / CONFUSION_FIGURE, "test/confusion_matrix")
        for writer in tensorboard_writers(trainer):
            text = "\n".join(
                ["| class | correct | total | accuracy |", "|---|---:|---:|---:|"]
                + [
                    f"| {r['class']} | {r['correct']} | {r['total']} | "
                    f"{'-' if r['accuracy'] is None else format(r['accuracy'], '.2%')} |"
                    for r in rows
                ]
            )
            writer.add_text("test/per_class_accuracy", text, global_step=trainer.global_step)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._matrix, self._logits = None, None

    def _figure(self, matrix: torch.Tensor, names: list[str]):
        count = len(names)
        annotated = count <= self.annotate_up_to
        # Annotated cells need room for their counts; past that a cell needs only a legible tick label.
        size = max(4.0, (0.55 if annotated else 0.2) * count + 2)
        fontsize = 8 if annotated else 6
        figure = new_figure(size + 1, size, layout="constrained")
        axis = figure.subplots()
        totals = matrix.sum(dim=1, keepdim=True).clamp_min(1)
        image = axis.imshow((matrix / totals).numpy(), cmap="Blues", vmin=0, vmax=1)
        figure.colorbar(image, ax=axis, label="fraction of the true class")
        rotation = {"rotation": 45, "ha": "right"} if annotated else {"rotation": 90, "ha": "center"}
        axis.set_xticks(range(count), names, fontsize=fontsize, **rotation)
        axis.set_yticks(range(count), names, fontsize=fontsize)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
        if annotated:
            fractions = matrix / totals
            for true in range(count):
                for predicted in range(count):
                    colour = "white" if fractions[true, predicted] > 0.5 else "black"
                    count_text = str(int(matrix[true, predicted]))
                    axis.text(predicted, true, count_text, ha="center", va="center", fontsize=7, color=colour)
        accuracy = matrix.diag().sum() / matrix.sum().clamp_min(1)
        axis.set_title(f"Test confusion matrix (accuracy {float(accuracy):.2%})")
        return figure
