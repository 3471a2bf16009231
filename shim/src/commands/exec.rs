//! `exec`: run a process in a running container (libcontainer's tenant builder).

use std::collections::HashMap;

use anyhow::Context as _;
use cryo_oci::Verb;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

use super::{load_for, wait_forwarding};
use crate::cli::ExecArgs;
use crate::context::Context;

/// `exec`
pub fn exec(ctx: &Context, a: &ExecArgs) -> anyhow::Result<i32> {
    let id = &a.container_id;
    load_for(ctx, id, Verb::Exec)?;
    if a.process.is_none() && a.command.is_empty() {
        anyhow::bail!("exec needs a command or --process FILE");
    }
    let env: HashMap<String, String> = a
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect();
    let (user, group) = match &a.user {
        Some(u) => {
            let (uid, gid) = u.split_once(':').unwrap_or((u.as_str(), ""));
            (
                Some(
                    uid.parse()
                        .with_context(|| format!("--user {u:?}: use uid[:gid]"))?,
                ),
                if gid.is_empty() {
                    None
                } else {
                    Some(
                        gid.parse()
                            .with_context(|| format!("--user {u:?}: use uid[:gid]"))?,
                    )
                },
            )
        }
        None => (None, None),
    };
    let pid = ContainerBuilder::new(id.clone(), SyscallType::default())
        .with_root_path(&ctx.root)?
        .with_console_socket(a.console_socket.as_ref())
        .with_pid_file(a.pid_file.as_ref())?
        .validate_id()?
        .as_tenant()
        .with_detach(a.detach)
        .with_cwd(a.cwd.as_ref())
        .with_env(env)
        .with_process(a.process.as_ref())
        .with_no_new_privs(a.no_new_privs)
        .with_capabilities(a.cap.clone())
        .with_user(user)
        .with_group(group)
        .with_container_args(a.command.clone())
        .build()
        .with_context(|| format!("cannot exec in container {id}"))?;
    if a.detach {
        return Ok(0);
    }
    Ok(wait_forwarding(pid))
}
