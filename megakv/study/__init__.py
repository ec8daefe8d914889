"""megakv-study: the paper's claims in miniature (fine-tuning, pre-training sweep, ablation), regenerable.

Each part (finetune.py, pretrain.py, ablation.py) trains or loads its models under OUT/<part>/, caches
every trained model and every measurement there (an interrupted part resumes), and returns a PartResult
(results.py) that report.py renders into OUT/report.md next to the part's PNGs.
"""
