"""The leaves every layer reads: settings, the task config with its model
ladders, and logging. Nothing here imports another package of the project;
only pydantic, tomllib and the standard library."""
