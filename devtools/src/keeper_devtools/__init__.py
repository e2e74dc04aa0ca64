"""Development tools of vTPM Keeper: the demo, the local stack, the contract generators and
the swtpm lab. They run the services and the CLI; nothing installed on a host imports them."""
