"""Data preparation and loading: tokenizers, Megatron-compatible `.bin/.idx` shards, GPT samples.

Modules, one concern each:
  errors       DataError, the one exception type for data problems (names the problem and the fix)
  indexed      reader/writer of the MMIDIDX `.bin/.idx` format (Megatron-LM / GPT-NeoX compatible)
  metadata     the `PREFIX.meta.json` written beside a pair, and dataset identity hashes
  tokenizer    train / import / save / load tokenizers (SentencePiece or Hugging Face)
  sources      finding input files and reading raw records from jsonl / txt / parquet (+ .gz)
  documents    one raw record -> its text, or the reason it is skipped
  preprocess   input files -> one `.bin/.idx` pair, with a worker pool
  progress     the progress bar of long data jobs
  merge        many pairs -> one pair, streaming
  output_lock  one writer per output prefix (prep, merge, qa prep), and the leftovers of killed ones
  samples      train/valid split by documents, fixed-length GPT samples, per-epoch shuffled order
  blend        mixing several sample sets by weights
  cache        the hash-named on-disk cache of sample orders (built by one rank, read by all)
  orders       which orders a data config needs, and how each is built, cached and loaded
  loader       build_data / micro_batches / valid_batches: what the training loop calls
  boundaries   document boundaries inside packed samples (reset_attention_mask / reset_position_ids)
  sft          (context, question, answer) records -> fixed-length samples with a loss mask (megakv-qa prep)
  qa_build     the offline extractive QA set built from Shakespeare's plays (megakv-qa build)
  fetch        downloading pinned packages (pip / npm / apt) into the cache outside the repo
  corpora      the Shakespeare demo corpus and the larger real mix (extraction and cleaning)
  recipes      one-command corpora: fetch -> split -> tokenizer -> pairs -> data.yaml
  cli_support  shared behaviour of the data command-line tools
"""
