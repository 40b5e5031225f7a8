"""Example pipelines for Conveyor: ``doc_pipeline`` (real work on text files) and ``noop``.

List them in ``worker.pipelines`` (``config/development.yaml``) as ``examples.doc_pipeline``;
``python worker.py`` and ``scripts/demo.py`` run from the repository root, so this package
is importable without installing it.
"""
