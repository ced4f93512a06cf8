"""Two lm-evaluation-harness tasks on local data, written by a test (nothing is downloaded):

- `moe_cluster_ppl`: perplexity (`loglikelihood_rolling`) of a few short documents, with the harness'
  word_perplexity, byte_perplexity and bits_per_byte, and token_perplexity: exp(-sum of the documents'
  log-likelihoods / their token count), the figure `moe-cluster perplexity` prints when each document is
  one window that starts with the tokenizer's EOS (the harness conditions a document's first token on it).
- `moe_cluster_mc`: a 4-way multiple choice (acc, acc_norm): each choice is scored by its log-likelihood
  after the question.

`write_tasks(directory, tokenizer_dir)` writes the YAML files, the JSON-lines data and the `utils.py` that
counts tokens with the served model's tokenizer; run them with `lm_eval --include_path DIRECTORY --tasks
moe_cluster_ppl,moe_cluster_mc` (the `json` dataset builder reads local files: nothing is downloaded).
From the shell, with documents of your own (one file each):

    .venv/bin/python -m tests.support.lm_eval_tasks DIRECTORY --tokenizer HF_MODEL_DIR --text doc1.txt doc2.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["PPL_TASK", "MC_TASK", "DOCUMENTS", "QUESTIONS", "write_tasks"]

PPL_TASK, MC_TASK = "moe_cluster_ppl", "moe_cluster_mc"

DOCUMENTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few experts and adds their answers.",
    "Ray Serve runs each expert in its own deployment, and the router sends each expert its tokens.",
]

QUESTIONS = [  # (question, four choices, index of the right one)
    ("The quick brown fox jumps over the lazy", ["dog.", "cat.", "experts.", "router."], 0),
    ("What is the capital of France?", ["Paris.", "Ray.", "two.", "fox."], 0),
    ("Once upon a time there was a small model that learned to", ["count.", "route.", "jump.", "serve."], 0),
    ("A mixture of experts routes every token to a few", ["experts", "dogs", "models", "tokens"], 0),
]

PPL_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
process_results: !function utils.process_results
metric_list:
  - metric: token_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""

MC_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

UTILS = '''"""token_perplexity beside the harness' own perplexities: the tokens are the served model's tokenizer's."""

import re

from transformers import AutoTokenizer

TOKENIZER = AutoTokenizer.from_pretrained({tokenizer_dir!r}, local_files_only=True)


def process_results(doc, results):
    (loglikelihood,) = results
    text = doc["text"]
    tokens = len(TOKENIZER(text, add_special_tokens=False)["input_ids"])
    size = len(text.encode("utf-8"))
    return {{"token_perplexity": (loglikelihood, tokens), "word_perplexity": (loglikelihood, len(re.split(r"\\s+", text))),
            "byte_perplexity": (loglikelihood, size), "bits_per_byte": (loglikelihood, size)}}
'''


def write_tasks(directory: Path, tokenizer_dir: Path, documents: list[str] | None = None) -> Path:
    """Write both tasks (YAML, data, utils.py) into `directory`, the perplexity task over `documents` (default:
    DOCUMENTS); returns the directory, absolute (the harness' --include_path)."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    ppl_data, mc_data = directory / "ppl.jsonl", directory / "mc.jsonl"
    ppl_data.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents or DOCUMENTS))
    mc_data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (directory / f"{PPL_TASK}.yaml").write_text(PPL_YAML.format(task=PPL_TASK, data=ppl_data))
    (directory / f"{MC_TASK}.yaml").write_text(MC_YAML.format(task=MC_TASK, data=mc_data))
    (directory / "utils.py").write_text(UTILS.format(tokenizer_dir=str(Path(tokenizer_dir).resolve())))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description="write lm-evaluation-harness tasks on local data: "
                                                 f"{PPL_TASK} (perplexity) and {MC_TASK} (multiple choice)")
    parser.add_argument("directory", type=Path, help="where to write them (lm_eval --include_path DIRECTORY)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="the served model's directory, for token counts")
    parser.add_argument("--text", type=Path, nargs="+", help="UTF-8 files, one document each (default: 3 sentences)")
    args = parser.parse_args()
    documents = [path.read_text(encoding="utf-8") for path in args.text] if args.text else None
    print(f"wrote {PPL_TASK} and {MC_TASK} in {write_tasks(args.directory, args.tokenizer, documents)}")


if __name__ == "__main__":
    main()
