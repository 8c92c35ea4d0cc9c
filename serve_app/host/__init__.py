"""What one model-host replica does: answer predictions from its cache, batch per model, run the
model's task.
"""
