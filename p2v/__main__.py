from p2v.cli import run

run()
