"""Issue 16: the caption corpus C is estimated on covers the text encoders' vocabulary (docs/method.md §3), and
the covariance cache never reuses an entry estimated on another corpus."""
import re
from collections import Counter

import pytest
import torch

from support.tiny_models import tiny_clip

pytestmark = pytest.mark.host

WHOLE_WORD = re.compile(r"[a-z0-9]+</w>")  # a whole word (ends a word: </w>) of ASCII letters or digits
REPEATS = 2


def test_every_whole_word_token_of_the_vocabulary_occurs_and_every_caption_is_one_chunk():
    """Every whole-word token of the CLIP BPE vocabulary (shared by CLIP-L, OpenCLIP-H and bigG in ComfyUI)
    occurs at least twice, tokenized as ComfyUI tokenizes; each caption fits one 77-token chunk, the only chunk
    the estimator reads."""
    from perfusion_ops.covariance import load_corpus
    corpus = load_corpus()
    clip = tiny_clip("sd1")
    tokenizer = clip.tokenizer.clip_l.tokenizer  # the Hugging Face CLIP tokenizer ComfyUI's SDTokenizer wraps
    for arch, encoder in (("sd2", "clip_h"), ("sdxl", "clip_g")):
        assert getattr(tiny_clip(arch).tokenizer, encoder).tokenizer.get_vocab() == tokenizer.get_vocab(), encoder
    counts, longest = Counter(), ""
    for caption in corpus:
        ids = tokenizer(caption)["input_ids"]
        assert len(ids) <= 77, f"longer than one chunk ({len(ids)} tokens): {caption!r}"
        counts.update(ids)
        longest = max(longest, caption, key=len)
    assert len(clip.tokenize(longest)["l"]) == 1, "ComfyUI splits the longest caption into two chunks"
    words = {token_id for token, token_id in tokenizer.get_vocab().items() if WHOLE_WORD.fullmatch(token)}
    missing = sorted(token_id for token_id in words if counts[token_id] < REPEATS)
    assert len(words) > 30000
    assert not missing, f"{len(missing)} of {len(words)} whole-word tokens occur fewer than {REPEATS} times, e.g. " \
                        f"{tokenizer.convert_ids_to_tokens(missing[:5])}"


def test_the_cache_entry_of_another_corpus_is_not_reused(small_corpus, tmp_path, monkeypatch):
    """The cache key covers the corpus: an entry estimated on another corpus (the one before this, say) is never
    read for this one; both entries stay side by side."""
    from perfusion_ops import covariance
    clip = tiny_clip("sd1")
    C_before, key_before = covariance.cached_covariance(clip, tmp_path)
    changed = small_corpus[:-1] + [small_corpus[-1] + ", kerfuffle"]
    monkeypatch.setattr(covariance, "load_corpus", lambda path=covariance.CORPUS: list(changed))
    C_after, key_after = covariance.cached_covariance(clip, tmp_path)
    assert key_after != key_before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{key_before}.safetensors", f"{key_after}.safetensors"])
    assert not torch.equal(C_after, C_before)
