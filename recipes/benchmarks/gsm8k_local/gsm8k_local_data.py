"""The data of the gsm8k_local tasks: GSM8K rows (question, answer) from the JSON-lines files
beside this module, so the tasks need no network and no datasets cache; and gsm8k_local_nll's metric."""

from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "data"


def load(**kwargs) -> datasets.DatasetDict:
    files = {"train": str(DATA / "train.jsonl"), "test": str(DATA / "test.jsonl")}
    return datasets.load_dataset("json", data_files=files)


def answer_nll(doc: dict, results: list) -> dict:
    """gsm8k_local_nll: the reference answer's negative log-likelihood per character (the
    continuation is the answer after lm-eval's one-space target delimiter)."""
    loglikelihood, _is_greedy = results[0]
    return {"nats_per_char": -loglikelihood / (len(doc["answer"]) + 1)}
