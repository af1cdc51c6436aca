"""One attempt of a job: its context and job directory, the phases of each kind (train, merge, shrink, grid, caption), fetching inputs, publishing outputs and their provenance."""
