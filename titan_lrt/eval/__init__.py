"""Evaluation of trained models (DESIGN 2.5). Modules:

    bpb          bits per byte: per pass, merged, exact recurrence, zero memory; position buckets
    logits       next-token logits of whole sequences in the exact, schedule and zero modes
    icl_tasks    synthetic in-context learning tasks (recall, copy, mapping), seeded
    icl          their scoring by next-token predictions at the answer positions
    core_bundle  reading a DCLM-format CORE bundle from a local folder; prompt rendering
    core         CORE-style scoring and centered accuracy
    report, cli  `python -m titan_lrt.eval`

A trained model is loaded with `titan_lrt.export.load_model`.
"""
