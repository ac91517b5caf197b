"""File names and format ids shared by every stage: one definition each (docs/formats.md).

Torch-free and dependency-free, so that the serving path can import it.
"""

# -- checkpoint directory (written by `train`, read by export, inspect, bench) ---------------------
ADAPTER_FILE = "adapter.safetensors"  # NAME.P, NAME.lam, NAME.Q, NAME.mask + other trained modules
CHECKPOINT_CONFIG_FILE = "adalora_config.json"
CHECKPOINT_FORMAT = "adalora-deploy-checkpoint"
TRIPLET_KEYS = ("P", "lam", "Q", "mask")  # tensor suffixes of one adapted module
FINGERPRINT_FILE = "fingerprint.safetensors"  # probe batch + the in-memory model's outputs at save time

# -- a PEFT AdaLoRA adapter directory (save_pretrained), accepted by export -----------------------
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_SOURCE_KIND = "peft-adalora"

# -- export directory: one sub-directory per mode ------------------------------------------------
MODES = ("merged", "factored")
MODEL_FILE = "model.onnx"  # external data, when written, is MODEL_FILE + "_data"
MODEL_CONFIG_FILE = "config.json"  # the transformers config
MANIFEST_FILE = "adalora_manifest.json"
MANIFEST_FORMAT = "adalora-deploy-export"
TOKENIZER_FILE = "tokenizer.json"  # the fast tokenizer the serving path loads with `tokenizers`
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # transformers' settings, + "model_input_names"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# Any one of these makes a directory loadable by AutoTokenizer (fast, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (TOKENIZER_FILE, "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model")

# -- many adapters on one base graph (docs/adapter_pack.md) -------------------------------------
ADAPTER_MODE = "adapter"  # export OUT/: an adapter pack (factors + head), no graph
MULTI_MODE = "multi"  # export OUT/multi/: one base graph, adapter factors and heads as run-time inputs
SERVE_MODES = (*MODES, MULTI_MODE)
ADAPTER_PACK_FILE = "adapter_pack.safetensors"  # MODULE.down (d_in, r), MODULE.up (r, d_out), head tensors
ADAPTER_MANIFEST_FILE = "adapter_manifest.json"
ADAPTER_PACK_FORMAT = "adalora-deploy-adapter-pack"
# graph inputs of a multi graph besides the tokenizer's
ADAPTER_INDEX_INPUT = "adapter_index"  # (batch,) int64: which stacked adapter each row uses
HEAD_WEIGHT_INPUT = "head.weight"  # (adapters, max num_labels, hidden)
HEAD_BIAS_INPUT = "head.bias"  # (adapters, max num_labels)
DOWN_SUFFIX = ".down"  # "<module>.down": (adapters, d_in, max rank at that module)
UP_SUFFIX = ".up"  # "<module>.up": (adapters, max rank at that module, d_out)

# -- graph input/output names of a causal LM with a KV cache ---------------------------------------
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

# -- task ids (checkpoint config "task", manifest "task") -----------------------------------------
SEQUENCE_CLASSIFICATION = "sequence-classification"
FEATURE_EXTRACTION = "feature-extraction"
TOKEN_CLASSIFICATION = "token-classification"
QUESTION_ANSWERING = "question-answering"
CAUSAL_LM = "causal-lm"
TASK_IDS = (SEQUENCE_CLASSIFICATION, FEATURE_EXTRACTION, TOKEN_CLASSIFICATION, QUESTION_ANSWERING, CAUSAL_LM)
LABELLED_TASKS = (SEQUENCE_CLASSIFICATION, TOKEN_CLASSIFICATION)  # id2label comes from the data

# -- demo output --------------------------------------------------------------------------------
DEMO_SUMMARY_FILE = "demo_summary.json"
