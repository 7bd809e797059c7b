"""``model.grad_checkpointing`` and ``train.compile``: the same loss and gradients as without, on tiny models.

Activation checkpointing is checked on every supported encoder family (ViT, Swin, PVTv2, MixMIM) and on a
fine-tuning classifier: identical loss and gradients, and the first block really runs twice per step (forward, then
recomputed in backward). ``train.compile`` is checked on a real 1-rank DeepSpeed engine: loss and gradients match
eager, the state_dict keeps its names (checkpoints, export: no ``_orig_mod.`` prefix), a checkpoint of a compiled
engine resumes into a compiled engine, and a FastMIM-P size change keeps working (recompiles). The fast tests use
the ``aot_eager`` backend (dynamo's graph capture and AOT autograd, without code generation: seconds on a busy CPU);
the inductor test is marked slow (its C++ compilation takes minutes on 2 shared cores).
"""
from __future__ import annotations

import pytest
import torch

from fastmim_ds.checkpoint import load, save
from fastmim_ds.config import ClassifierCfg, PretrainCfg, load_config
from fastmim_ds.ds_engine import create_engine
from fastmim_ds.methods import create_mim_model
from fastmim_ds.models.classifier import create_classifier
from fastmim_ds.weights import load_pretrained_encoder

TINY_VIT = ["model.encoder_kwargs={embed_dim: 32, depth: 2, num_heads: 2}", "data.img_size=64",
            "method.decoder_dim=32"]
SWIN = ["model.encoder=swin_tiny_patch4_window7_224", "data.img_size=128", "method.block_size=32",
        "model.encoder_kwargs={embed_dim: 32, depths: [1, 1, 2, 1], num_heads: [1, 2, 2, 4], window_size: 4}",
        "method.decoder_dim=32"]
PVT = ["model.encoder=pvt_v2_b2", "data.img_size=64", "method.block_size=32", "method.decoder_dim=32",
       "model.encoder_kwargs={embed_dims: [16, 32, 32, 64], depths: [1, 1, 1, 1], num_heads: [1, 2, 2, 4]}"]
MIXMIM = ["method.name=mixmim", "model.encoder=mixmim_tiny_test", "method.decoder_dim=32", "method.decoder_depth=1",
          "method.decoder_heads=1", "method.target=pixel", "method.mask_ratio=0.5", "data.img_size=64"]
# the other methods' own encoder forwards: MAE's visible-token ViT, SimMIM's mask token after the Swin patch embedding
MAE = [*TINY_VIT, "method.name=mae", "method.decoder_depth=1", "method.decoder_heads=1"]
SIMMIM_SWIN = [*SWIN[:2], *SWIN[3:4], "method.name=simmim", "method.block_size=32"]
FAMILIES = {"vit": TINY_VIT, "swin": SWIN, "pvt_v2": PVT, "mixmim": MIXMIM, "mae-vit": MAE, "simmim-swin": SIMMIM_SWIN}

pytestmark = pytest.mark.usefixtures("one_thread")


def _first_block(encoder: torch.nn.Module) -> torch.nn.Module:
    for attr in ("blocks", "layers", "stages"):
        seq = getattr(encoder, attr, None)
        if seq is not None:
            return seq[0] if attr == "blocks" else seq[0].blocks[0]
    raise AssertionError(type(encoder))


def _mim_step(overrides: list[str], checkpointing: bool) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, gradients and forward calls of the first encoder block for one step on a fixed batch and mask."""
    cfg = load_config(PretrainCfg, None, overrides + [f"model.grad_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = create_mim_model(cfg.method, cfg.model, cfg.data.img_size).train()
    calls = []
    _first_block(model.encoder).register_forward_pre_hook(lambda *_: calls.append(1))
    size = cfg.data.img_size
    imgs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    mask = model.draw_mask(2, (size, size))
    loss = model(imgs, mask)["loss"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_grad_checkpointing_same_loss_and_gradients(family):
    loss0, grads0, calls0 = _mim_step(FAMILIES[family], False)
    loss1, grads1, calls1 = _mim_step(FAMILIES[family], True)
    assert (calls0, calls1) == (1, 2), "the checkpointed block must be recomputed in backward"
    assert loss1 == pytest.approx(loss0, rel=1e-6, abs=1e-7)
    assert grads1.keys() == grads0.keys() and grads0
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_classifier_grad_checkpointing_same_loss_and_gradients():
    results = []
    for on in (False, True):
        torch.manual_seed(0)
        model, _ = create_classifier(
            ClassifierCfg(name="vit_base_patch16_224", kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
                          drop_path=0.0, grad_checkpointing=on), num_classes=3, img_size=32)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        loss = model(x).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
    (l0, g0, c0), (l1, g1, c1) = results
    assert (c0, c1) == (1, 2)
    assert l1 == pytest.approx(l0, rel=1e-6)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing_is_free_to_change_on_resume():
    from fastmim_ds.checks import check_resume_compatible

    saved = load_config(PretrainCfg, None, TINY_VIT)
    now = load_config(PretrainCfg, None, TINY_VIT + ["model.grad_checkpointing=true", "train.compile=true"])
    from fastmim_ds.config import to_dict

    check_resume_compatible(now, to_dict(saved), "ckpt/step1")  # no ConfigError: no shape changes


# ----------------------------------------------------------------------------------------------- torch.compile


def _engine(compiled: bool, backend: str, stage: int = 0):
    cfg = load_config(PretrainCfg, None, TINY_VIT)
    torch.manual_seed(0)
    model = create_mim_model(cfg.method, cfg.model, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
    return create_engine(model, opt, ds, compile=compiled, compile_backend=backend), model


def _batch(size: int = 64, seed: int = 1):
    from fastmim_ds.masking import BlockMaskGenerator

    imgs = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    mask = BlockMaskGenerator(ratio=0.75, block_size=16)(2, (size, size), generator=torch.Generator().manual_seed(seed))
    return imgs, mask


def _compare_compiled(backend: str, tmp_path, *, rtol: float, atol: float) -> None:
    eager, _ = _engine(False, backend)
    comp, model = _engine(True, backend)
    assert comp.is_compiled and comp.module is model
    for step, size in enumerate((64, 64, 32)):  # the last step after a FastMIM-P size change (recompiles)
        if size != 64:
            eager.module.set_img_size(size)
            comp.module.set_img_size(size)
        imgs, mask = _batch(size, seed=step)
        losses, grads = [], []
        for eng in (eager, comp):
            loss = eng(imgs, mask)["loss"]
            eng.backward(loss)
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in eng.module.named_parameters() if p.grad is not None})
            eng.step()
        assert losses[1] == pytest.approx(losses[0], rel=rtol, abs=atol), (step, losses)
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=rtol, atol=atol, msg=f"step {step}: {name}")
    # the product's step draws the mask inside the compiled model (torch.rand of the new size's grid)
    loss = comp(_batch(32, seed=5)[0])["loss"]
    comp.backward(loss)
    comp.step()
    assert torch.isfinite(loss)
    # checkpoints and export see the plain module names
    keys = list(comp.module.state_dict())
    assert keys == list(eager.module.state_dict()) and not any("_orig_mod" in k for k in keys)
    save(comp, tmp_path / "ckpt", tag="step00000003", client_state={"epoch": 0}, keep_last=2)
    encoder, _ = load_pretrained_encoder(tmp_path / "ckpt")
    assert set(encoder) == set(model.encoder.state_dict())
    # a compiled engine resumes from it and continues like the one that wrote it
    resumed, _ = _engine(True, backend)
    load(resumed, tmp_path / "ckpt", "step00000003")
    resumed.module.set_img_size(32)
    imgs, mask = _batch(32, seed=7)
    with torch.no_grad():
        a, b = comp(imgs, mask)["loss"].item(), resumed(imgs, mask)["loss"].item()
    assert b == pytest.approx(a, rel=rtol, abs=atol)


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.timeout(300)
def test_compile_same_loss_and_gradients_resume_export(tmp_path):
    _compare_compiled("aot_eager", tmp_path, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.timeout(1800)
def test_compile_inductor_same_loss_and_gradients(tmp_path):
    """The accelerator's default backend (inductor): generated kernels reorder sums, so a looser tolerance."""
    _compare_compiled("", tmp_path, rtol=1e-4, atol=1e-6)
