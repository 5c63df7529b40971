"""The driver hashes the model once: its revision reaches the embed actors, which then hash nothing.

Hashing reads every weight file (2.2 GB for jina-v3), once per actor when the revision is not passed.
Real Ray: the stage is built in an actor process, as Ray Data builds it.
"""

from __future__ import annotations

import dataclasses

import ray
from shared_data import minilm_dir, sts_sentences

from model.loading import content_revision
from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.embed import EmbedSpec, EmbedStage
from pipeline.read import list_files
from pipeline.run import build_dataset, resolve


@ray.remote
class StageInAnActor:
    def build(self, spec: EmbedSpec) -> tuple[int, str]:
        """(weight hashings done in this process while building the stage, the stage's model identity)."""
        from model import loading

        real, calls = loading.content_revision, []

        def counting(path):
            calls.append(path)
            return real(path)

        loading.content_revision = counting
        try:
            identity = EmbedStage(spec).model_identity
        finally:
            loading.content_revision = real
        return len(calls), identity


def _spec(**kwargs) -> EmbedSpec:
    return EmbedSpec(model=str(minilm_dir()), task=None, dims=(384,), vector_dtype="float32", precision="float32",
                     late=False, window=256, overlap=None, keep_columns=(), **kwargs)


def test_an_actor_given_the_revision_hashes_nothing(ray_up):
    actor = StageInAnActor.remote()
    given = ray.get(actor.build.remote(_spec(revision="from-the-driver")))
    own = ray.get(actor.build.remote(_spec()))
    name = own[1].split("@")[0]
    assert given == (0, f"{name}@from-the-driver")
    assert own[0] >= 1 and own[1] == f"{name}@{content_revision(minilm_dir())}"


def test_build_dataset_hands_the_drivers_revision_to_the_actors(ray_up, tmp_path, make_shards, write_shards):
    write_shards(tmp_path / "in", make_shards(sts_sentences(4), shards=1))
    cfg = JobConfig(source=SourceConfig(input=str(tmp_path / "in")), chunking=ChunkingConfig(mode="none"),
                    encode=EncodeConfig(model=str(minilm_dir()), actors=1, precision="float32"),
                    sink=SinkConfig(db=str(tmp_path / "db"), table="t"))
    job = resolve(cfg)
    job = dataclasses.replace(job, info=dataclasses.replace(job.info, revision="from-the-driver"))
    rows = build_dataset(job, list_files(cfg.source, job.storage)).take_all()
    assert len(rows) == 4 and {r["model"] for r in rows} == {f"{job.info.name}@from-the-driver"}
