"""Model loading: seeded random init, open_clip_train checkpoints and sidecars, local-dir, refusals."""

import hashlib
import json
import pickle

import pytest
import torch

from chips_core.features.models import CONFIG_DIR, ModelLoadError, load_model, resolve_device

pytestmark = pytest.mark.unit


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A chips-tiny-vit whose weights differ from the seeded init, saved the way open_clip_train saves."""
    lm = load_model("chips-tiny-vit", seed=7)
    with torch.no_grad():
        for p in lm.model.parameters():
            p.add_(0.01)
    root = tmp_path_factory.mktemp("logs") / "run1"
    ckpt = root / "checkpoints" / "epoch_2.pt"
    ckpt.parent.mkdir(parents=True)
    state = {"module." + k: v for k, v in lm.model.state_dict().items()}  # DDP prefix
    opt = torch.optim.AdamW(lm.model.parameters()).state_dict()
    torch.save({"epoch": 2, "name": "run1", "state_dict": state, "optimizer": opt}, ckpt)
    (root / "params.txt").write_text("batch_size: 8\nmodel: chips-tiny-vit\npretrained: \n")
    return lm, ckpt


def test_random_init_is_seeded_and_recorded():
    a, b, c = load_model("chips-tiny-vit"), load_model("chips-tiny-vit"), load_model("chips-tiny-vit", seed=1)
    assert _state_equal(a.model, b.model) and not _state_equal(a.model, c.model)
    assert a.identity.pretrained == "random-init:seed=0" and a.identity.checkpoint is None
    assert c.identity.pretrained == "random-init:seed=1"
    assert not a.model.training
    images = torch.zeros(2, 3, *a.image_size)
    h, t = a.encode(images, a.tokenizer(["a cat", "a dog"]))
    assert h.shape == (2, a.d_v) and t.shape == (2, a.d_t)


def test_open_clip_train_checkpoint_with_name_argument(trained):
    lm, ckpt = trained
    loaded = load_model("chips-tiny-vit", str(ckpt))
    assert _state_equal(loaded.model, lm.model)
    assert loaded.identity.checkpoint == str(ckpt.resolve())
    assert loaded.identity.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert loaded.identity.pretrained is None


def test_checkpoint_name_from_params_txt_and_json_sidecar(trained, tmp_path):
    lm, ckpt = trained
    assert _state_equal(load_model(str(ckpt)).model, lm.model)  # params.txt one folder up
    alone = tmp_path / "weights.pt"
    alone.write_bytes(ckpt.read_bytes())
    with pytest.raises(ModelLoadError, match="weights.pt: no model name given and no sidecar"):
        load_model(str(alone))
    (tmp_path / "weights.pt.json").write_text(json.dumps({"model": "chips-tiny-vit"}))
    loaded = load_model(str(alone))
    assert loaded.identity.name == "chips-tiny-vit" and _state_equal(loaded.model, lm.model)
    # same bytes at another path: same identity hash
    assert loaded.identity.checkpoint_sha256 == load_model(str(ckpt)).identity.checkpoint_sha256


def test_local_dir_bundle(trained, tmp_path):
    lm, _ = trained
    cfg = json.loads((CONFIG_DIR / "chips-tiny-vit.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    torch.save(lm.model.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    loaded = load_model(f"local-dir:{tmp_path}")
    assert _state_equal(loaded.model, lm.model)
    assert loaded.identity.checkpoint.endswith("open_clip_pytorch_model.bin")
    assert loaded.identity.checkpoint_sha256 is not None


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": {"x": _Evil()}}, f)
    with pytest.raises(ModelLoadError, match="evil.pt cannot be loaded into 'chips-tiny-vit'.*[Ww]eights"):
        load_model("chips-tiny-vit", str(bad))


def test_mismatched_checkpoint_names_file_and_model(tmp_path):
    other = tmp_path / "timm.pt"
    torch.save({"state_dict": load_model("chips-tiny-timm").model.state_dict()}, other)
    with pytest.raises(ModelLoadError, match="timm.pt cannot be loaded into 'chips-tiny-vit'"):
        load_model("chips-tiny-vit", str(other))


def test_clear_errors_for_missing_unknown_and_offline(tmp_path):
    with pytest.raises(ModelLoadError, match="checkpoint file not found: .*nope.pt"):
        load_model("chips-tiny-vit", str(tmp_path / "nope.pt"))
    with pytest.raises(ModelLoadError, match="unknown open_clip model 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="hf-hub:chips-test/absent.*HF_HUB_OFFLINE=1"):
        load_model("hf-hub:chips-test/absent")
    with pytest.raises(ModelLoadError, match="local-dir:.*no open_clip_config.json"):
        load_model(f"local-dir:{tmp_path}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        resolve_device("cuda")


def test_tensor_jpeg_path_reproduces_the_pil_preprocess():
    """decode_jpegs (nvJPEG + tensor ops on CUDA; the same code runs on the CPU) ≈ the PIL preprocess."""
    import io

    from PIL import Image
    from skimage import data

    lm = load_model("chips-tiny-vit")
    assert lm.gpu_preprocess_supported()
    raws = []
    for arr, size in ((data.astronaut(), (300, 256)), (data.camera(), (200, 260)), (data.coffee(), (96, 64))):
        buf = io.BytesIO()
        Image.fromarray(arr).convert("RGB").resize(size).save(buf, format="JPEG", quality=90)
        raws.append(buf.getvalue())
    pil = torch.stack([lm.preprocess(Image.open(io.BytesIO(r))) for r in raws])
    tensor = lm.decode_jpegs([torch.frombuffer(bytearray(r), dtype=torch.uint8) for r in raws])
    assert tensor.shape == pil.shape == (3, 3, *lm.image_size)
    diff = (tensor - pil).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.2  # interpolation rounding only; a wrong crop/scale is ~1
    assert (tensor - pil.flip(-1)).abs().mean() > 0.05  # the check can fail
