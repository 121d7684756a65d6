"""repablate.bench.audit_ops: what a forward runs, and the article's pitfalls flagged from evidence."""

from __future__ import annotations

import torch
from torch import nn

from repablate.bench import audit_ops
from repablate.nn import Conv, RepConv, RepMobileBlock, reparameterize


def network() -> nn.Sequential:
    return nn.Sequential(RepConv(3, 8, s=2), RepConv(8, 8), RepMobileBlock(8, 16), RepConv(16, 16, use_identity=False))


X = torch.randn(2, 3, 16, 16)


def test_deployed_model_runs_no_batch_norm_and_one_convolution_per_block():
    audit = audit_ops(reparameterize(network()), X)
    assert audit.ok, audit.problems()
    assert audit.expect_deployed
    assert not any("batch_norm" in op for op in audit.ops)
    assert audit.ops["aten.convolution"] == 5  # four RepConv and one depthwise Conv, one conv each
    for block in audit.blocks:
        assert block.deployed and block.calls == 1
        assert block.count(lambda op: "conv" in op) == 1
        assert block.count(lambda op: op == "aten.add") == 0


def test_training_form_lists_every_block_with_its_branches():
    audit = audit_ops(network(), X)
    assert audit.ok and not audit.expect_deployed
    branches = {block.name: block.branches for block in audit.blocks}
    assert branches["0"] == ("dense", "1x1")  # 3 -> 8 channels at stride 2: no identity
    assert branches["1"] == ("dense", "1x1", "identity")
    assert branches["3"] == ("dense", "1x1")  # use_identity=False
    assert branches["2.depthwise"] == ()  # a plain Conv has no branches
    assert {block.name for block in audit.blocks} == {"0", "1", "2.rep", "2.depthwise", "3"}
    assert audit.ops["aten.add"] == 1 + 2 + 1 + 0 + 1  # branch sums of blocks 0, 1, 2.rep, 2.depthwise, 3
    assert sum(block.count(lambda op: op == "aten.add") for block in audit.blocks) == audit.ops["aten.add"]


def test_model_whose_fusion_was_skipped_is_flagged():
    model = network()
    audit = audit_ops(model, X, expect_deployed=True)
    assert not audit.ok
    assert set(audit.unfused) == {"0", "1", "2.rep", "2.depthwise", "3"}
    assert any("batch_norm still runs" in problem for problem in audit.problems())
    assert "left unfused" in audit.to_markdown()


def test_partly_fused_model_is_flagged_without_being_told():
    model = network()
    model[0].reparameterize()
    audit = audit_ops(model, X)
    assert audit.expect_deployed and not audit.ok
    assert "0" not in audit.unfused and "1" in audit.unfused


def test_identity_branch_on_a_strided_conv_is_flagged_and_the_failed_forward_reported():
    model = nn.Sequential(RepConv(8, 8, s=2), RepConv(8, 8))
    model[0].rbr_identity = nn.BatchNorm2d(8)  # as a YOLOv7 port or a hand edit could leave it
    training = [module.training for module in model.modules()]
    audit = audit_ops(model, torch.randn(1, 8, 8, 8))
    problems = audit.problems()
    assert any(p.startswith("0: identity branch") and "stride (2, 2)" in p for p in problems)
    assert any("forward pass failed" in p for p in problems) and "size of tensor" in audit.forward_error
    assert not any(p.startswith("1:") for p in problems)
    assert [module.training for module in model.modules()] == training  # modes restored


def test_identity_branch_across_channel_counts_is_flagged():
    block = RepConv(4, 8)
    block.rbr_identity = nn.BatchNorm2d(4)
    assert any("c1=4 != c2=8" in problem for problem in audit_ops(block, torch.randn(1, 4, 6, 6)).problems())


def test_deployed_block_that_still_sums_branches_is_flagged():
    class HalfFused(nn.Module):  # claims deploy=True but still adds a second path
        deploy = True

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def reparameterize(self):
            pass

        def forward(self, x):
            return self.conv(x) + x

    problems = audit_ops(HalfFused(), torch.randn(1, 4, 5, 5)).problems()
    assert problems == ["<root>: ran 1 addition(s) although deployed (branches not fused)"]


def test_a_block_called_twice_runs_one_convolution_per_call():
    block = reparameterize(Conv(4, 4, 3))
    audit = audit_ops(nn.Sequential(block, block), torch.randn(1, 4, 5, 5))
    assert audit.ok
    (shared,) = audit.blocks
    assert shared.calls == 2 and shared.count(lambda op: "conv" in op) == 2


def test_yolov7_style_module_without_reparameterize_is_audited():
    class YoloRepConv(nn.Module):  # YOLOv7's attribute names, no repablate protocol
        def __init__(self):
            super().__init__()
            self.rbr_identity = nn.BatchNorm2d(4)
            self.rbr_dense = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4))
            self.rbr_1x1 = nn.Sequential(nn.Conv2d(4, 4, 1, 2, 0, bias=False), nn.BatchNorm2d(4))

        def forward(self, x):
            return self.rbr_dense(x) + self.rbr_1x1(x)

    audit = audit_ops(nn.Sequential(YoloRepConv()), torch.randn(1, 4, 8, 8), expect_deployed=True)
    (block,) = audit.blocks
    assert block.branches == ("dense", "1x1", "identity") and not block.deployed
    assert any("identity branch" in p for p in block.problems) and any("left unfused" in p for p in block.problems)


def test_deployed_head_with_one_conv_per_level_is_held_only_to_no_batch_norm():
    class Head(nn.Module):  # like a detection head fused per level: several convs by design, plus decoding adds
        deploy = True

        def __init__(self):
            super().__init__()
            self.levels = nn.ModuleList(nn.Conv2d(4, 6, 1) for _ in range(2))

        def reparameterize(self):
            pass

        def forward(self, x):
            return [conv(x) + 1 for conv in self.levels]

    audit = audit_ops(Head(), torch.randn(1, 4, 5, 5))
    assert audit.ok, audit.problems()
    assert audit.blocks[0].conv_modules == 2 and audit.blocks[0].count(lambda op: "conv" in op) == 2
