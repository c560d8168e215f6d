"""Evaluation: answer extraction and grading shared by the toy verifiers, distillation and lm-eval tasks."""
