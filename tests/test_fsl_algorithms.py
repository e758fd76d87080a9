"""Few-shot algorithms: ProtoNet logits and evaluation cache, MAML adaptation, the LightningModule."""

from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from torch import nn

from bgn_lightning import BatchGroupNorm2d
from tasks.fsl.episodes import Episode
from tasks.fsl.l2l import learn2learn
from tasks.fsl.maml import maml_episode
from tasks.fsl.module import FewShotModule, mean_ci95
from tasks.fsl.protonet import EmbeddingCache, protonet_logits, prototype_logits, prototypes

pytestmark = pytest.mark.usefixtures("one_thread")


# -- Prototypical Networks ---------------------------------------------------------------------
def test_prototypes_are_class_means_and_logits_negative_squared_distances():
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1])
    protos = prototypes(support, labels, ways=2)
    assert torch.equal(protos, torch.tensor([[1.0, 0.0], [0.0, 4.0]]))
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]])
    logits = prototype_logits(query, protos)
    assert torch.allclose(logits, torch.tensor([[-1.0, -10.0], [-10.0, -1.0]]))
    assert torch.allclose(logits, -torch.cdist(query, protos) ** 2)
    # an episode's embeddings: support first, then queries
    assert torch.equal(protonet_logits(torch.cat([support, query]), labels), logits)


class _Counting(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.images = inner, 0

    def forward(self, x):
        self.images += len(x)
        return self.inner(x)


def test_embedding_cache_embeds_each_image_once_for_per_sample_encoders():
    torch.manual_seed(0)
    encoder = _Counting(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval())
    images, cache = torch.randn(10, 3), EmbeddingCache()
    first = cache.embed(encoder, images[:6], torch.arange(6))
    assert cache.per_sample
    again = cache.embed(encoder, images[[5, 2, 7, 8]], torch.tensor([5, 2, 7, 8]))
    assert encoder.images == 6 + 2 + 2  # probe (6 + 2), then only ids 7 and 8
    assert torch.allclose(first, encoder.inner(images[:6]), atol=1e-6)
    assert torch.allclose(again, encoder.inner(images[[5, 2, 7, 8]]), atol=1e-6)


def test_embedding_cache_switches_off_for_batch_statistics():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    images, cache = torch.randn(8, 3), EmbeddingCache()
    cache.embed(encoder, images[:6], torch.arange(6))
    assert cache.per_sample is False
    out = cache.embed(encoder, images[2:8], torch.arange(2, 8))
    assert torch.allclose(out, encoder(images[2:8]))  # the episode's own batch statistics


# -- MAML --------------------------------------------------------------------------------------
def _maml(first_order: bool = False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), BatchGroupNorm2d(4, track_running_stats=False),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    return learn2learn().algorithms.MAML(net, lr=0.5, first_order=first_order)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_adapts_fast_weights_not_the_meta_parameters(first_order):
    maml = _maml(first_order)
    before = [p.detach().clone() for p in maml.parameters()]
    support, support_labels = torch.randn(6, 1, 5, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    query, query_labels = torch.randn(9, 1, 5, 5), torch.arange(3).repeat_interleave(3)
    learner = maml.clone()
    learner.adapt(nn.functional.cross_entropy(learner(support), support_labels))
    fast = list(learner.parameters())
    assert all(not torch.equal(f, b) for f, b in zip(fast, before, strict=True))  # every weight moved
    assert all(torch.equal(p, b) for p, b in zip(maml.parameters(), before, strict=True))  # originals kept
    # the query loss of the adapted clone back-propagates to the meta-parameters
    logits = maml_episode(maml, support, support_labels, query, steps=2)
    nn.functional.cross_entropy(logits, query_labels).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in maml.parameters())
    assert all(torch.equal(p, b) for p, b in zip(maml.parameters(), before, strict=True))


def test_second_order_maml_differs_from_first_order():
    support, support_labels = torch.randn(6, 1, 5, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    query, query_labels = torch.randn(9, 1, 5, 5), torch.arange(3).repeat_interleave(3)
    grads = []
    for first_order in (False, True):
        maml = _maml(first_order)
        logits = maml_episode(maml, support, support_labels, query, steps=1)
        nn.functional.cross_entropy(logits, query_labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in maml.parameters()]))
    assert not torch.allclose(grads[0], grads[1])


def test_second_order_maml_meta_gradient_of_bgn_at_g_equal_c_is_batchnorms():
    # MAML differentiates through the inner gradient (BGN's double backward): with G = C the
    # meta-gradient must be BatchNorm's, on whichever BGN path runs here.
    torch.manual_seed(0)

    def net(norm):
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm(4), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()

    bn = net(lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    bgn = net(lambda c: BatchGroupNorm2d(c, c, track_running_stats=False))
    bgn.load_state_dict(bn.state_dict())
    support, support_labels = torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    query, query_labels = torch.randn(9, 1, 6, 6, dtype=torch.float64), torch.arange(3).repeat_interleave(3)
    grads = []
    for model in (bn, bgn):
        maml = learn2learn().algorithms.MAML(model, lr=0.4, first_order=False)
        logits = maml_episode(maml, support, support_labels, query, steps=2)
        loss = nn.functional.cross_entropy(logits, query_labels)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# -- the LightningModule -----------------------------------------------------------------------
def test_mean_ci95():
    values = torch.tensor([0.5, 0.7, 0.9, 0.7])
    mean, ci = mean_ci95(values)
    assert mean == pytest.approx(0.7)
    assert ci == pytest.approx(1.96 * values.std().item() / math.sqrt(4))


def test_module_builds_norms_per_algorithm():
    proto = FewShotModule(norm="bgn", algorithm="protonet", hidden=8, in_channels=1, input_size=28)
    bgn = [m for m in proto.encoder.modules() if isinstance(m, BatchGroupNorm2d)]
    assert len(bgn) == 4 and all(m.track_running_stats for m in bgn)  # as configured
    maml = FewShotModule(norm="bn", algorithm="maml", hidden=8, in_channels=1, input_size=28, num_classes=5)
    bn = [m for m in maml.learner.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn) == 4 and not any(m.track_running_stats for m in bn)  # transductive
    head = maml.learner.module[1]
    assert (head.in_features, head.out_features) == (8, 5)
    # BGN's auto-G is still open after building; the first support set (5 images) fixes it on the
    # meta-parameters: G = C * 5 / 32 -> 8 for C = 64
    auto = FewShotModule(norm="bgn", algorithm="maml", in_channels=1, input_size=28, num_classes=5)
    layers = [m for m in auto.learner.modules() if isinstance(m, BatchGroupNorm2d)]
    assert [m.num_groups for m in layers] == [None] * 4
    support, labels, query = torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(10, 1, 28, 28)
    ids = torch.arange(15)
    auto._episode_logits(Episode(support, labels, query, labels.repeat(2), ids[:5], ids[5:]), training=True)
    assert [m.num_groups for m in layers] == [8] * 4 and not any(m.track_running_stats for m in layers)
    mini = FewShotModule(norm="gn", algorithm="maml", hidden=8, in_channels=3, input_size=84, num_classes=5)
    assert mini.learner.module[1].in_features == 8 * 5 * 5
    with pytest.raises(ValueError, match="algorithm must be 'protonet' or 'maml'"):
        FewShotModule(algorithm="reptile")
    with pytest.raises(ValueError, match="unknown norm"):
        FewShotModule(norm="batchnorm", in_channels=1, input_size=28)


def test_quiet_learn2learn_import_leaves_log_handlers_on_real_streams():
    """Only gym's notice is swallowed: loggers created while learn2learn imports (pytorch_lightning's)
    must not keep writing into the buffer that swallowed it."""
    learn2learn()
    names = [n for n in logging.Logger.manager.loggerDict if n.startswith(("pytorch_lightning", "lightning"))]
    loggers = [logging.getLogger(name) for name in names]
    streams = [h.stream for lg in loggers for h in getattr(lg, "handlers", []) if hasattr(h, "stream")]
    assert streams and not any(isinstance(s, io.StringIO) for s in streams)
