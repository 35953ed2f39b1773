import json

from datamodules import chunk


def test_chunks_follow_storystream_semantics(tmp_path):
    stories = [
        {"id": 77, "images": [f"a/{i}.png" for i in range(30)], "captions": [f"c{i}" for i in range(30)],
         "orders": list(range(30)), "characters": [[f"n{i}"] for i in range(30)], "background": "snow"},
        {"id": 5, "images": [f"b/{i}.png" for i in range(25)], "captions": [f"d{i}" for i in range(25)],
         "orders": list(range(25))},
        {"id": 6, "images": [f"c/{i}.png" for i in range(9)], "captions": [f"e{i}" for i in range(9)]},
    ]
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(s) + "\n" for s in stories) + "not json\n")
    n_stories, n_chunks, n_bad = chunk.chunk_file(src, dst, length=10)
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert (n_stories, n_chunks, n_bad) == (3, 5, 1)
    # 30 frames -> 3 chunks, 25 -> 2 (tail of 5 dropped), 9 -> none
    assert [c["id"] for c in out] == [0, 0, 0, 1, 1]  # id = index of the source story
    for k, c in enumerate(out[:3]):
        assert c["images"] == stories[0]["images"][10 * k : 10 * k + 10]
        assert c["captions"] == stories[0]["captions"][10 * k : 10 * k + 10]
        assert c["characters"] == stories[0]["characters"][10 * k : 10 * k + 10]
        assert c["background"] == "snow" and "orders" not in c
    assert out[4]["images"] == stories[1]["images"][10:20]


def test_chunk_cli(tmp_path, tiny_world):
    dst = tmp_path / "chunks.jsonl"
    chunk.main([str(tiny_world / "train.jsonl"), str(dst), "--length", "10"])
    out = [json.loads(line) for line in dst.read_text().splitlines()]
    assert len(out) == 16 * 3 and all(len(c["images"]) == 10 for c in out)
