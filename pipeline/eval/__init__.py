"""Evaluation of embeddings: a user of the embed job (it reads the tables the job writes), not one of its stages.

`retrieval`: ranking metrics, BEIR retrieval over a written table, STS; `qmsum`: the late-chunking study.
No module of the job (the rest of `pipeline/`) imports from here; tests/test_layering.py checks it.
"""
