"""Document-boundary masking: a token's logits do not depend on the documents packed before it."""

from __future__ import annotations

import pytest
import torch

from megakv.config import ConfigError, ModelConfig, load_config
from megakv.data.boundaries import (
    document_attention_mask,
    document_ids,
    document_position_ids,
    mask_documents,
)
from megakv.model import MegaKVModel
from megakv.routing import RoutingPlan

EOD = 2


def test_ids_positions_and_mask_by_hand():
    tokens = torch.tensor([[5, 6, EOD, 7, 8, 9, EOD, 4], [EOD, 5, 6, 7, 8, 9, 10, 11]])
    assert document_ids(tokens, EOD).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_position_ids(tokens, EOD).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    mask = document_attention_mask(tokens, EOD)
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False, False, False, False]  # EOD ends doc 0
    assert mask[1, 0, 7].tolist() == [False] + [True] * 7


def _model() -> MegaKVModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    return MegaKVModel(cfg).eval()


@pytest.mark.parametrize("plan", [None, RoutingPlan((0, 0, 1, 1))], ids=["own", "routed"])
def test_a_tokens_logits_do_not_depend_on_the_previous_document(plan):
    model = _model()
    second = torch.tensor([[10, 11, 12, 13, 14, 15]])
    alone = model(second, plan=plan)
    previous_a, previous_b = torch.tensor([[20, 21, 22, EOD]]), torch.tensor([[40, 41, 42, 43, 44, EOD]])
    handle = mask_documents(model, EOD, reset_attention_mask=True, reset_position_ids=True)
    with torch.no_grad():
        packed_a = model(torch.cat([previous_a, second], dim=1), plan=plan)[:, 4:]
        packed_b = model(torch.cat([previous_b, second], dim=1), plan=plan)[:, 6:]
    torch.testing.assert_close(packed_a, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed_b, alone, atol=1e-5, rtol=1e-5)
    handle.remove()  # without masking the previous document leaks in
    leaked = model(torch.cat([previous_a, second], dim=1), plan=plan)[:, 4:]
    assert (leaked - alone).abs().max() > 1e-2


def test_only_the_mask_keeps_positions_running():
    model = _model()
    tokens = torch.tensor([[20, 21, EOD, 10, 11, 12]])
    mask_documents(model, EOD, reset_attention_mask=True, reset_position_ids=False)
    masked_only = model(tokens)[:, 3:]
    shifted = MegaKVModel.forward(model, torch.tensor([[10, 11, 12]]), position_ids=torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(masked_only, shifted, atol=1e-5, rtol=1e-5)
    assert mask_documents(model, EOD, False, False) is None


def test_the_options_are_config_fields_refused_with_pipeline_parallelism():
    cfg = load_config(None, ["data.reset_attention_mask=true", "data.reset_position_ids=true"])
    assert cfg.data.reset_attention_mask and cfg.data.reset_position_ids
    with pytest.raises(ConfigError, match="data.reset_attention_mask.*pipeline"):
        load_config(None, ["data.reset_attention_mask=true", "parallel.pipeline=2", "parallel.zero_stage=1"])


def test_resets_are_refused_on_data_whose_documents_do_not_end_with_eod(tmp_path):
    """A Megatron pair prepared without --append-eod has no EOD: the resets would silently do nothing."""
    import numpy as np

    from megakv.data.indexed import IndexedWriter
    from megakv.data.tokenizer import read_info
    from megakv.testing.tiny_data import prepare_tiny_dataset
    from megakv.train.preflight import check_document_ends

    prepared = prepare_tiny_dataset(tmp_path / "tiny")
    eod = read_info(prepared.parent / "tokenizer").eos_id
    rng = np.random.default_rng(0)
    no_eod = tmp_path / "tiny" / "data" / "megatron_no_eod"
    with IndexedWriter(no_eod, np.uint16) as writer:
        for _ in range(50):
            writer.add_document(rng.integers(eod + 5, 300, size=int(rng.integers(5, 40))))
        writer.finalize()
    resets = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
    check_document_ends(load_config(None, [f"data.datasets=[{prepared}]", *resets]))  # megakv-prep's: fine
    check_document_ends(load_config(None, [f"data.datasets=[{no_eod}]"]))  # no reset asked for: fine
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].*its sequences hold no end-of-document "
                                          r"token.*reset_attention_mask and data.reset_position_ids.*append-eod"):
        check_document_ends(load_config(None, [f"data.datasets=[{prepared},{no_eod}]", *resets]))
    with pytest.raises(ConfigError, match=r"data.valid_datasets\[0\].*reset_position_ids would find"):
        check_document_ends(load_config(None, [f"data.datasets=[{prepared}]", f"data.valid_datasets=[{no_eod}]",
                                               "data.reset_position_ids=true"]))
    # Megatron's --split-sentences with --append-eod: only a document's last sentence ends with EOD; accepted.
    split = tmp_path / "tiny" / "data" / "megatron_sentences"
    with IndexedWriter(split, np.uint16) as writer:
        for _ in range(50):
            sentences = [rng.integers(eod + 5, 300, size=6) for _ in range(4)]
            sentences[-1] = np.append(sentences[-1], eod)
            writer.add_documents(np.concatenate(sentences), np.array([len(s) for s in sentences]))
        writer.finalize()
    check_document_ends(load_config(None, [f"data.datasets=[{split}]", *resets]))
    # QA samples padded with a pad id other than EOD: the EOD lies inside each sequence, not at its end.
    padded = tmp_path / "tiny" / "data" / "qa_padded"
    with IndexedWriter(padded, np.uint16) as writer:
        for _ in range(50):
            writer.add_document(np.concatenate([rng.integers(eod + 5, 300, size=9), [eod], [eod + 1] * 6]))
        writer.finalize()
    check_document_ends(load_config(None, [f"data.datasets=[{padded}]", *resets]))
