#!/usr/bin/env python3
import os, sys, poolport.tools.cli; sys.exit(poolport.tools.cli.main(["serve", "--config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "seed.yaml")]))
