"""ACC / ASR / RA through real Loaders with a stub model of known predictions, and the paper's DER."""
import pytest
import torch
from torch import nn

from d3_plugin.data import DatasetSpec, ImageSet, Loader
from d3_plugin.evaluation import defense_effectiveness_rate, evaluate, summarize

from conftest import TEST_SEED, observed

pytestmark = pytest.mark.trained  # see conftest.py

# mean 0, std 1: the loader feeds pixel / 255, so the stub can read the pixel value back exactly
SPEC = DatasetSpec("stub", 10, 1, 4, (0.0,), (1.0,), crop_padding=4)


class Answer(nn.Module):
    """Predicts the class written in pixel (0, 0) of each image (one-hot logits)."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(1, 1)

    def forward(self, x):
        answer = (x[:, 0, 0, 0] * 255).round().long()
        return nn.functional.one_hot(answer, 10).float() * 5


def images_answering(answers):
    images = torch.zeros(len(answers), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(answers, dtype=torch.uint8)
    return images


def test_evaluate_counts_acc_asr_ra_over_several_batches():
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    answers = [3, 1, 4, 0, 5, 9, 7, 6, 0, 3]  # 7 of 10 right
    clean = ImageSet(images_answering(answers), torch.tensor(labels))
    true = [1, 2, 3, 4, 5, 6, 7, 8]
    bd_answers = [0, 0, 0, 4, 0, 6, 9, 8]  # 4 → target 0, 3 → true class, 1 → neither
    backdoor = ImageSet(images_answering(bd_answers), torch.zeros(8, dtype=torch.long), torch.tensor(true),
                        torch.ones(8, dtype=torch.bool))
    model = Answer().train()
    results = evaluate(model, Loader(clean, SPEC, 3), Loader(backdoor, SPEC, 3))
    assert results["acc"] == pytest.approx(0.7)
    assert results["asr"] == pytest.approx(0.5)
    assert results["ra"] == pytest.approx(3 / 8)
    assert results["clean_loss"] > 0 and results["bd_loss"] > 0
    assert model.training  # the mode is restored


def test_evaluate_with_one_loader_only():
    clean = ImageSet(images_answering([2, 2]), torch.tensor([2, 5]))
    results = evaluate(Answer(), Loader(clean, SPEC, 8))
    assert set(results) == {"acc", "clean_loss"} and results["acc"] == 0.5


# ---------------------------------------------------------------- DER (paper: Δ = before − after)

@pytest.mark.parametrize("before, after, der", [
    ((0.90, 0.95), (0.90, 0.95), 0.5),      # no change
    ((0.90, 1.00), (0.90, 0.00), 1.0),      # perfect: ASR gone, ACC kept
    ((0.90, 0.95), (0.88, 0.05), 0.94),     # (0.90 − 0.02 + 1) / 2
    ((0.90, 0.10), (0.90, 0.40), 0.5),      # ASR rises: ΔASR clipped to 0
    ((0.80, 0.95), (0.85, 0.15), 0.9),      # ACC rises: no bonus, (0.8 + 1) / 2
    ((0.90, 0.10), (0.30, 0.60), 0.2),      # worst kind: ACC falls by 0.6, ASR rises
    ((1.00, 0.00), (0.00, 1.00), 0.0),      # lower end of the range
])
def test_der_paper_formula(before, after, der):
    assert defense_effectiveness_rate(before[0], before[1], after[0], after[1]) == pytest.approx(der)


def _backdoorbench_der(acc_before, asr_before, acc_after, asr_after):
    """BackdoorBench utils/metric.py `defense_effectiveness_rate`: it ADDS the ACC drop."""
    return (max(0, asr_before - asr_after) + max(0, acc_before - acc_after) + 1) / 2


def test_der_is_not_backdoorbench_formula():
    case = (0.90, 0.95, 0.70, 0.05)  # a defense that costs 20 ACC points
    ours = defense_effectiveness_rate(*case)
    assert ours == pytest.approx(0.85)
    assert _backdoorbench_der(*case) == pytest.approx(1.05)  # out of [0, 1]: rewards the ACC loss
    assert ours < defense_effectiveness_rate(0.90, 0.95, 0.90, 0.05)  # losing ACC must lower DER


@pytest.mark.parametrize("bad", [(90.0, 0.9, 0.9, 0.1), (0.9, -0.1, 0.9, 0.1), (0.9, 0.9, 1.01, 0.1),
                                 (0.9, 0.9, 0.9, 95.0)])
def test_der_rejects_values_outside_unit_interval(bad):
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        defense_effectiveness_rate(*bad)


def test_summarize_reports_after_metrics_and_der():
    before = {"acc": 0.9, "asr": 0.95, "ra": 0.04}
    after = {"acc": 0.88, "asr": 0.05, "ra": 0.8, "clean_loss": 0.3}
    assert summarize(before, after) == pytest.approx({"acc": 0.88, "asr": 0.05, "ra": 0.8, "der": 0.94})


# ---------------------------------------------------------------- precision

RGB = DatasetSpec("rgb", 4, 3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_padding=0)


def small_convnet():
    torch.manual_seed(TEST_SEED)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4))


def test_bf16_evaluate_agrees_with_fp32_on_a_tiny_model():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (300, 3, 16, 16), generator=g, dtype=torch.uint8)
    clean = ImageSet(images[:200], torch.randint(0, 4, (200,), generator=g))
    backdoor = ImageSet(images[200:], torch.zeros(100, dtype=torch.long), torch.randint(1, 4, (100,), generator=g),
                        torch.ones(100, dtype=torch.bool))
    model = small_convnet().eval()
    loaders = (Loader(clean, RGB, 64), Loader(backdoor, RGB, 64))
    fp32 = evaluate(model, *loaders, precision="fp32")
    assert evaluate(model, *loaders) == pytest.approx(fp32, rel=1e-5)  # channels_last fp32 = plain fp32
    bf16 = evaluate(model, *(Loader(d.data, RGB, 512) for d in loaders), precision="bf16")
    for key in ("acc", "asr", "ra"):  # measured ≤ 0.01 (losses: ≤ 0.0053 relative)
        assert observed(f"bf16 − fp32 {key}", abs(bf16[key] - fp32[key])) <= 0.03
    for key in ("clean_loss", "bd_loss"):
        assert observed(f"bf16 / fp32 {key} − 1", abs(bf16[key] / fp32[key] - 1)) <= 0.02
    # predictions themselves agree on all but a few near-ties
    with torch.no_grad():
        x = loaders[0].prepare(clean.images)
        reference = model(x).argmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x.contiguous(memory_format=torch.channels_last)).float().argmax(1)
    agreement = (reference == low).float().mean().item()
    assert observed("bf16 / fp32 prediction agreement", agreement) >= 0.95  # measured 0.995–1
    assert model[0].weight.is_contiguous() and not model.training  # format and mode restored
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_evaluate_leaves_no_inference_tensors_in_a_model_it_converted():
    model = small_convnet().train()
    clean = ImageSet(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    evaluate(model, Loader(clean, RGB, 4), precision="bf16")
    assert not any(p.is_inference() for p in model.parameters())
    loss = model(torch.randn(2, 3, 16, 16)).sum()  # still trainable
    loss.backward()
    assert model.training and model[0].weight.grad is not None


def test_eval_batch_size_follows_the_device_unless_given():
    from d3_plugin.evaluation import eval_batch_size
    assert eval_batch_size("cpu") == 64 and eval_batch_size(torch.device("cpu")) == 64
    assert eval_batch_size("cuda") == 512 and eval_batch_size("cuda:1") == 512
    assert eval_batch_size("cpu", 1024) == 1024 and eval_batch_size("cuda", 32) == 32


def test_folding_batchnorm_keeps_the_function_and_leaves_the_model_alone():
    from d3_plugin.evaluation import folded
    from d3_plugin.models import build_model
    torch.manual_seed(TEST_SEED)
    model = build_model("preactresnet18", 10, 3, 32).eval()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = torch.randn(8, 3, 32, 32)
    fast = folded(model)
    assert fast is not model and sum(isinstance(m, nn.BatchNorm2d) for m in fast.modules()) < \
        sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(fast(inputs), model(inputs), atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_model_with_forward_hooks_is_evaluated_unfolded():
    from d3_plugin.evaluation import folded
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    handle = model[2].register_forward_hook(lambda _m, _i, out: out.clamp(max=0.1))  # e.g. BadActs' clipping
    assert folded(model) is model
    handle.remove()
    assert folded(model) is not model
