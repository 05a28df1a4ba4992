"""Beyond the paper's DPO: IPO, length normalisation, mDPO's conditional term and anchor. Each term
against hand-computed values; the weakened-image forward against the plain path; 03's objective
wiring at step 1, where the policy equals the reference and every log-ratio is 0."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import attention
import common
import data
import dist_io
from conftest import ARCHS, arch_world, plain_inputs, run_here
from families import family_of, image_features


def test_ipo_loss_hand_computed():
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -18.0])
    rc, rr = torch.tensor([-11.0, -19.0]), torch.tensor([-11.0, -19.0])
    losses, chosen_rewards, rejected_rewards = common.ipo_loss(pc, pr, rc, rr, beta=0.1)
    # h = (pc - rc) - (pr - rr) = [1 - (-1), -1 - 1] = [2, -2]; target 1 / (2 * 0.1) = 5
    assert torch.allclose(losses, torch.tensor([9.0, 49.0]))
    assert torch.allclose(chosen_rewards, torch.tensor([0.1, -0.1])) and torch.allclose(rejected_rewards,
                                                                                        torch.tensor([-0.1, 0.1]))
    pc.requires_grad_(True)
    common.ipo_loss(pc, pr, rc, rr, 0.1)[0].sum().backward()
    assert torch.allclose(pc.grad, torch.tensor([2 * (2 - 5.0), 2 * (-2 - 5.0)]))  # d/dpc (h - 5)^2


def test_conditional_and_anchor_terms_hand_computed():
    pc, pcw = torch.tensor([-10.0, -5.0]), torch.tensor([-14.0, -5.0])
    rc, rcw = torch.tensor([-11.0, -6.0]), torch.tensor([-12.0, -4.0])
    # conditional: beta [(pc - rc) - (pcw - rcw)] = 0.5 [1 - (-2), 1 - (-1)] = [1.5, 1.0]
    want = torch.tensor([math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(-1.0))])
    assert torch.allclose(common.conditional_loss(pc, pcw, rc, rcw, beta=0.5), want)
    # anchor: beta (pc - rc) = 0.1 [1, 1]
    assert torch.allclose(common.anchor_loss(pc, rc, beta=0.1), torch.full((2,), math.log(1 + math.exp(-0.1))))
    pcw.requires_grad_(True)
    common.conditional_loss(pc, pcw, rc, rcw, 0.5).sum().backward()
    assert (pcw.grad > 0).all()  # lowering the answer's log-prob under the weakened image lowers the loss


@pytest.mark.parametrize("arch", ARCHS)
def test_weakened_packed_forward_equals_the_plain_path(arch, request):
    """The conditional term's forward (the image weakened per image with its own seed, packed, logits at the scored
    rows) against the plain one: pixels through the whole model under the same seeded weakening, a full
    log-softmax."""
    toy, (model, processor) = arch_world(request, arch)
    recs = json.load(open(toy / "train.json"))[:2]
    weaken = [(900, "features", 11), (800, "features", 12)]  # the quick worlds read their images faintly
    fmt = family_of(model).input_format
    examples, plain = [], []
    with torch.no_grad():
        for rec, (step, where, seed) in zip(recs, weaken):
            image = data.load_image(toy / "images", rec["image"])
            examples.append((image, "Describe the image.", [rec["conversations"][1]["value"]], ()))
            vision, seqs, _ = common.build_sequences(processor, image, "Describe the image.",
                                                     [rec["conversations"][1]["value"]], 512, fmt)
            ids, labels = seqs[0]
            with common.weaken_images(model, step, where, torch.Generator().manual_seed(seed)):
                logits = model(**plain_inputs(model, torch.tensor([ids]), vision)).logits[0, :-1]
            target = torch.tensor(labels[1:])
            logp = F.log_softmax(logits.double(), -1).gather(1, target.clamp(min=0)[:, None])[:, 0]
            plain.append(float((logp * (target != common.IGNORE)).sum()))
        batch = common.pack_pairs(processor, examples, 512, fmt)
        inputs = attention.Kernel("padded", "tested", rule=attention.rule_for(model.config)).inputs(batch)
        weak = image_features(model, batch, weaken)
        packed = common.response_logps(model, model, inputs, batch["scored"], 2, weak)[0]
        clean = common.response_logps(model, model, inputs, batch["scored"], 2)[0]
    assert packed.tolist() == pytest.approx(plain, rel=1e-4)
    assert (packed - clean).abs().min() > 1e-3  # the weakening changes what the model sees


def test_objective_terms_at_step_one(toy, tmp_path):
    """At step 1 LoRA's B is zero: policy = reference, every log-ratio 0. So IPO's term is
    (0 - 1/(2 beta))^2 = 25 at beta 0.1, the anchor and the conditional term are ln 2 each, and `loss`
    is their weighted sum."""
    recs = json.load(open(toy / "train.json"))[:5]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({
        "id": r["id"], "image": r["image"], "prompt": "Describe the image.", "chosen": r["conversations"][1]["value"],
        "rejected": n["conversations"][1]["value"], "source": "toy", "method": "image_weakened",
        "meta": {"noise_step": 700, "noise_on": "features"}}) + "\n" for r, n in zip(recs, recs[1:])))
    proc = run_here("03_train_bpo.py", "--model", toy / "model", "--data", pairs, "--image_root", toy / "images",
                    "--output_dir", tmp_path / "run", "--batch_size", 4, "--max_steps", 1, "--save_every", 0,
                    "--lora_r", 4, "--lora_alpha", 8, "--loss", "ipo", "--length_normalize",
                    "--anchor_weight", 0.5, "--conditional_weight", 0.3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = dist_io.read_jsonl(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["loss/anchor"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss/conditional"] == pytest.approx(math.log(2), abs=1e-5)
    assert row["loss"] == pytest.approx(25 + 0.8 * math.log(2), abs=1e-4)
    cache = dist_io.read_jsonl(tmp_path / "run" / "ref_logps.jsonl")
    assert all({"chosen", "rejected", "chosen_weak"} <= r.keys() for r in cache)
    assert all(r["chosen_weak"] != r["chosen"] for r in cache)


def test_preference_loss_hand_computed():
    """common.preference_loss, the whole objective of a micro-batch, against math-module values: DPO with
    every added term on per-token log-ratios, IPO, and SFT's token mean."""
    ls = lambda z: math.log(1 / (1 + math.exp(-z)))  # log sigmoid
    pol = torch.tensor([-10.0, -6.0, -12.0, -9.0], requires_grad=True)  # chosen 1, chosen 2, rejected 1, rejected 2
    ref = torch.tensor([-11.0, -6.5, -11.0, -8.0])
    n = torch.tensor([5, 3, 4, 6])
    weak = (torch.tensor([-13.0, -7.0]), torch.tensor([-12.0, -6.0]), torch.tensor([5, 3]))  # policy, ref, tokens
    loss, m = common.preference_loss(pol, ref, n, loss="dpo", beta=0.5, length_normalize=True, sft_weight=0.2,
                                     conditional_weight=0.3, anchor_weight=0.4, weak=weak)
    want, chosen_rewards = [], []
    for i in range(2):
        c = (pol[i].item() - ref[i].item()) / n[i].item()  # per-token log-ratios
        r = (pol[i + 2].item() - ref[i + 2].item()) / n[i + 2].item()
        cw = (weak[0][i].item() - weak[1][i].item()) / weak[2][i].item()
        want.append(-ls(0.5 * (c - r)) + 0.2 * -pol[i].item() / n[i].item() + 0.3 * -ls(0.5 * (c - cw))
                    + 0.4 * -ls(0.5 * c))
        chosen_rewards.append(0.5 * c)
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    assert m["loss"].item() == pytest.approx(sum(want) / 2, rel=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(sum(chosen_rewards) / 2, rel=1e-6)
    assert m["loss/sft"].item() == pytest.approx((10 / 5 + 6 / 3) / 2, rel=1e-6)
    assert m["logps/chosen"].item() == pytest.approx(-8.0) and m["logps/rejected"].item() == pytest.approx(-10.5)
    assert loss.requires_grad and not any(v.requires_grad for v in m.values())  # metrics detached: logged only
    # IPO on summed log-ratios: h = (pc - rc) - (pr - rr) = [1 - (-1), 0.5 - (-1)]; target 1 / (2 * 0.5) = 1
    loss, m = common.preference_loss(pol, ref, n, loss="ipo", beta=0.5)
    assert loss.item() == pytest.approx(((2 - 1) ** 2 + (1.5 - 1) ** 2) / 2)
    assert set(m) == {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                      "logps/chosen", "logps/rejected"}
    assert m["rewards/accuracies"].item() == 1.0 and m["rewards/margins"].item() == pytest.approx(0.5 * 1.75)
    # SFT: the mean NLL over the micro-batch's answer tokens, the rejected answers and the reference unused
    loss, m = common.preference_loss(pol[:2], None, n[:2], loss="sft")
    assert loss.item() == pytest.approx(16 / 8) and set(m) == {"loss", "logps/chosen"}
