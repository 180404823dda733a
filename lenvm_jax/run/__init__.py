"""A run directory (`--workdir`): its lock, the configs it trained with and its checkpoints, read without the trainer.

  <workdir>/.lock                     host and pid of the trainer that runs it (workdir_lock.py)
  <workdir>/config.json               the RunConfig (loss.gamma resolved), written once a run has started cleanly
  <workdir>/config.<step>.json        a config that a resumed run replaced: it trained the steps up to <step>
                                      (config_history.py); config.json also records the run's EOS ids and
                                      tokenizer (run_record, eos.py)
  <workdir>/checkpoints/<step>/       orbax: state (TrainState), data_iter (grain position), metrics (eval metrics,
                                      with checkpoint.keep_best) and orbax's commit marker (commit_success.txt)
  <workdir>/checkpoints/<step>/lenvm_checksums.json   size + CRC32 of each file of the step, once it is committed
  <workdir>/checkpoint_checksums.json   written before a run's first save: steps after `required_after_step` count
                                      only once their checksums are written too
  <workdir>/rejected_checkpoints/<step>-<time>/       steps a resuming trainer found incomplete or corrupt, moved aside
                                      (checkpoint_layout.py)

One module per job: workdir_checks (a path that can be a workdir, created), workdir_lock, config_history,
checkpoint_layout (which steps count, checksums, the step a reader asks for), checkpoint_restore (the one restore
core, used by the trainer's Checkpointer and by the readers' `restore_params`) and eos (what are this run's EOS ids).
"""
