"""Training methods: how a teacher (jigsaw, isd) or a student (cluster classification, distill) is trained."""
