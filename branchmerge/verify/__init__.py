"""Checking answers: extraction from responses, graders (math, letters, code, toy), the code sandbox."""
