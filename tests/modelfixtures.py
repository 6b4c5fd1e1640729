"""Real tokenizer + tiny random Llama, saved as a local model directory.

The tokenizer is SmolLM2-135M-Instruct's (extracted from the packaged GGUF into
tests/data/smollm2-tokenizer); the model is a Llama of the same architecture
family with random weights and few layers, so tests run in seconds.
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "data" / "smollm2-tokenizer"

TINY_LAYERS = 4
TINY_D_MODEL = 64
TINY_CONTEXT = 512


def make_tiny_llama_dir(dest: Path, n_layers: int = TINY_LAYERS, seed: int = 0) -> Path:
    """Write a tiny random Llama plus the real tokenizer to `dest`; return it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=TINY_D_MODEL,
        intermediate_size=TINY_D_MODEL * 2,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def collect_tiny_run(
    tmp_path_factory, run_name: str, data_config: dict, upload_config: dict
) -> tuple[Path, Path, dict]:
    """One worker's whole run of a fresh tiny Llama (float32) into a fresh local vault:
    (model dir, vault root, run_worker's result)."""
    from collector.config import load_config
    from collector.worker import run_worker
    from vaultsh.events import EventSink

    tiny = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")
    root = tmp_path_factory.mktemp("vault")
    cfg = load_config(
        {
            "run_name": run_name,
            "num_runs": 1,
            "transformer_config": {"model_name": str(tiny), "dtype": "float32"},
            "data_config": data_config,
            "upload_config": upload_config,
            "storage": {"uri": str(root)},
        }
    )
    return tiny, root, run_worker(cfg, 0, sink=EventSink(0, callback=lambda e: None))
