"""Models before a worker loads them: preparing the bundled ones, weight
conversions (`convert`), fine-tuning (`finetune`, `training`), labeled data
(`labeled`) and training sets from stored results (`distill`). No worker
imports this package."""
