"""Data for LoRA fine-tuning: user audio -> AudioCraft dataset (`prepare`), and up-front checks (`validate`).

Modules, one job each:
    sources.py       find clips and their captions (a folder of audio, or a metadata.json)
    splits.py        deterministic train/valid split, evaluate/generate subsets
    audio_files.py   probe headers, decode, convert and write audio
    sidecars.py      the MusicInfo `<stem>.json` that AudioCraft's MusicDataset reads next to each audio file
    placement.py     where a prepared clip and its sidecar live (in place, mirrored symlink, converted, cut)
    manifests.py     `egs/<name>/<split>/data.jsonl` (AudioMeta lines) and `config/dset/audio/<name>.yaml`
    prepare.py       the `prepare` pipeline; `prepare_cli.py` is its command line
    file_checks.py   checks of one audio file and its sidecar (never raise)
    report.py        issues found by validation and their summary table
    validate.py      check every manifest entry before training; `validate_cli.py` is its command line
    summary.py       clip-length statistics and the suggested `dataset.segment_duration`
    example.py       a tiny deterministic demo dataset (synthesized beats)

Importing this package is cheap; AudioCraft (slow to import) is only loaded by the modules that need it.
"""
