"""Stage 2's keep-or-code head: labels, decoding, the k-means codebook, training and the export."""

import pytest
import torch

from lightning_modules.components.feature_codebook import CodebookConfig, FeatureCodebook, fit_codebook, kmeans
from lightning_modules.mllm_export import load_mllm, save_mllm
from tests.test_story_mllm import _batch, _module, _train, tokenizer_dir  # noqa: F401  (fixture)


def _codebook(codes: torch.Tensor) -> FeatureCodebook:
    book = FeatureCodebook(CodebookConfig(size=len(codes)), codes.shape[1])
    book.codes.copy_(codes)
    return book


def test_labels_pick_the_nearer_of_keep_and_the_nearest_code_and_decode_to_it():
    torch.manual_seed(0)
    book = _codebook(torch.randn(8, 5))
    kept, target = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    target[0, 0] = kept[0, 0] + 0.01  # barely changed: keep
    target[1, 1] = book.codes[6]  # exactly a code
    labels = book.labels(kept, target)
    for index in torch.cartesian_prod(torch.arange(3), torch.arange(4)).tolist():
        i, j = index
        options = torch.cat([kept[i, j][None], book.codes])  # keep first: a tie keeps
        distances = (options - target[i, j]).norm(dim=-1)
        assert labels[i, j] == int(torch.argmin(distances))
        torch.testing.assert_close(book.decode(kept, labels)[i, j], options[labels[i, j]])
    assert labels[0, 0] == 0 and labels[1, 1] == 7
    # the decoded frame is never farther from the target than the kept one, token by token
    decoded = book.decode(kept, labels)
    assert ((decoded - target).norm(dim=-1) <= (kept - target).norm(dim=-1) + 1e-6).all()


def test_the_joint_loss_is_the_cross_entropy_of_the_labels_and_accuracy_counts_changed_tokens():
    torch.manual_seed(0)
    book = _codebook(torch.randn(6, 4))
    book.config.loss = "joint"
    kept, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    labels = book.labels(kept, target)
    perfect = torch.nn.functional.one_hot(labels, 7).float() * 50
    ce, accuracy = book.loss(perfect, kept, target)
    assert ce < 1e-6 and accuracy == 1
    wrong = torch.nn.functional.one_hot((labels + 1) % 7, 7).float() * 50
    expected = torch.nn.functional.cross_entropy(wrong.flatten(0, 1), labels.flatten())
    ce, accuracy = book.loss(wrong, kept, target)
    torch.testing.assert_close(ce, expected)
    assert accuracy == 0


def test_the_factored_loss_is_keep_or_change_over_all_tokens_plus_the_code_over_changing_ones():
    torch.manual_seed(0)
    book = _codebook(torch.randn(6, 4))
    kept, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    target[0, :3] = kept[0, :3]  # unchanged: keep
    labels = book.labels(kept, target).flatten()
    assert (labels == 0).any() and (labels != 0).any()
    logits = torch.randn(2, 5, 7)
    keep_or_change, which_code = [], []
    for scores, label in zip(logits.flatten(0, 1), labels.tolist()):
        p = scores.softmax(-1)
        keep_or_change.append(-torch.log(p[0] if label == 0 else p[1:].sum()))
        if label:
            which_code.append(-torch.log(p[label] / p[1:].sum()))
    expected = torch.stack(keep_or_change).mean() + torch.stack(which_code).mean()
    book.config.loss = "factored"
    torch.testing.assert_close(book.loss(logits, kept, target)[0], expected)
    book.config.loss = "joint"  # the same terms, the code's averaged over every token
    joint = torch.stack(keep_or_change).mean() + torch.stack(which_code).sum() / len(labels)
    torch.testing.assert_close(book.loss(logits, kept, target)[0], joint)


def test_kmeans_finds_well_separated_clusters_and_fit_reads_until_enough_tokens():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    tokens = centers.repeat(200, 1) + 0.1 * torch.randn(800, 2, generator=generator)
    codes = kmeans(tokens, 4, iterations=10, seed=0)
    assert torch.cdist(centers, codes).min(dim=1).values.max() < 0.1  # one code at every center
    with pytest.raises(ValueError, match="codebook.size"):
        kmeans(tokens[:3], 4, iterations=1, seed=0)
    book = FeatureCodebook(CodebookConfig(size=4, fit_tokens=400, iterations=10), 2)
    read = []

    def frames():
        for part in tokens.view(100, 4, 2, 2):  # batches of 4 frames x 2 tokens
            read.append(part)
            yield part

    assert fit_codebook(book, frames()) == 400
    assert len(read) == 50 and bool(book.fitted)  # 400 tokens, then it stops reading
    torch.testing.assert_close(book.codes, kmeans(tokens[:400], 4, iterations=10, seed=0))


def test_a_codebook_stage_2_decodes_whole_tokens_learns_and_survives_export(tiny_world, tokenizer_dir, tmp_path):  # noqa: F811
    torch.manual_seed(0)
    codebook = CodebookConfig(size=32, fit_tokens=4000, iterations=5)
    module = _module(tokenizer_dir, supervise="all", queries_from_previous=True, codebook=codebook, rec_loss="mse")
    batch = _batch(tiny_world, n=4, max_images=4)
    features, _ = module.story_features(batch)
    fit_codebook(module.codebook, [features])
    history = _train(module, batch, steps=40)
    assert history[-1]["code_loss"] < 0.5 * history[0]["code_loss"]
    assert history[-1]["rec_loss"] < history[0]["rec_loss"]  # the decoded frames come closer to the truth
    module.eval()
    with torch.no_grad():
        out = module.forward_story(batch)
    # every predicted token is the edited frame's own token or a whole code, as the scores say
    labels = out.code_logits.argmax(-1)
    kept = labels == 0
    torch.testing.assert_close(out.predicted_features[kept], out.previous_features[kept])
    torch.testing.assert_close(out.predicted_features[~kept], module.codebook.codes[labels[~kept] - 1])
    reloaded = load_mllm(save_mllm(module, tmp_path / "export"))
    torch.testing.assert_close(reloaded.codebook.codes, module.codebook.codes)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.forward_story(batch).predicted_features, out.predicted_features)
    with pytest.raises(ValueError, match="residual_features"):
        _module(tokenizer_dir, residual_features=True, codebook=codebook)
