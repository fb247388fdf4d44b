"""The `gramflow` command line (`main`) and the demo it runs (`demo`)."""
