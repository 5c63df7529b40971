#!/usr/bin/env bash
# Submit the embed job to a running Ray cluster (Ray Jobs API, Ray 2.60).
#
#   RAY_ADDRESS=http://ray-head:8265 infra/ray/submit.sh                       # defaults below
#   RAY_ADDRESS=http://ray-head:8265 CORPUS=wiki infra/ray/submit.sh --dims 1024,128 --index
#
# Extra arguments are passed to `python -m jobs.embed` after the defaults (later flags win).
# The encoders are one-GPU actors, 1..ACTORS of them, whether or not a GPU node is up yet: on an elastic
# cluster (kuberay/raycluster.yaml, GPU group from 0) they are what the autoscaler adds GPU nodes for.
# The submission id is deterministic per corpus and UTC day: Ray rejects a duplicate id
# ("already exists"), so a scheduled or retried submit cannot start the same day's job twice.
# Follow it with `ray job logs --follow <id>`, stop it with `ray job stop <id>`.
# Credentials are NOT passed here: the cluster's pods get them from a k8s Secret or an IAM role.
set -euo pipefail

cd "$(dirname "$0")/../.."  # repo root: runtime_env.yaml's working_dir is "."

: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
: "${CORPUS:=docs}"
: "${INPUT:=s3://example-corpus/${CORPUS}/}"
: "${OUTPUT:=s3://example-lake/lancedb}"
: "${MODEL:=/models/jina-embeddings-v3}"  # baked into the image; or s3://example-models/jina-embeddings-v3
: "${ACTORS:=8}"  # the most GPUs the job may use: the GPU group's maxReplicas
: "${SUBMISSION_ID:=embed-${CORPUS}-$(date -u +%Y%m%d)}"
export RAY_ADDRESS

ray job submit \
  --submission-id "${SUBMISSION_ID}" \
  --runtime-env infra/ray/runtime_env.yaml \
  --metadata-json "{\"corpus\": \"${CORPUS}\", \"submitted_by\": \"${USER:-unknown}\"}" \
  ${NO_WAIT:+--no-wait} \
  -- python -m jobs.embed \
    --input "${INPUT}" \
    --output "${OUTPUT}" \
    --table "${CORPUS}" \
    --model "${MODEL}" \
    --task retrieval.passage \
    --dims 1024,256,64 \
    --chunking sentences --late-chunking \
    --mode overwrite \
    --device gpu --actors "1..${ACTORS}" \
    "$@"
