//! Start-up and shutdown on the main reactor: builds the RPC method table,
//! loads the configuration, starts the RPC server (after the configuration,
//! unless `--wait-for-rpc` asks for it during start-up), and registers the
//! shutdown hooks (stop serving RPC first, then unregister every bdev).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bdev::rpc::{RpcState, RpcTable};

use crate::app_rpc::{self, AppContext};
use crate::cli::Cli;
use crate::jsonrpc::RpcServer;
use bdev::config;

fn build_table(ctx: Rc<AppContext>) -> Rc<RpcTable> {
    let mut table = RpcTable::new();
    bdev::register_rpcs(&mut table);
    nvmf::register_rpcs(&mut table);
    app_rpc::register(&mut table, ctx.clone());
    let table = Rc::new(table);
    *ctx.table.borrow_mut() = Rc::downgrade(&table);
    table
}

fn fail(msg: String) {
    log::error!("{msg}");
    eprintln!("ferroplane: {msg}");
    reactor::shutdown(1);
}

/// The main reactor's start-up task.
pub async fn run(cli: Cli) {
    // Registered first, so it runs last: bdevs go after RPC stops.
    reactor::on_shutdown(|| async {
        bdev::registry::unregister_all().await;
    });
    let state = Rc::new(Cell::new(if cli.wait_for_rpc {
        RpcState::Startup
    } else {
        RpcState::Runtime
    }));
    let (start_tx, start_rx) = reactor::completion();
    let ctx = Rc::new(AppContext {
        table: RefCell::new(std::rc::Weak::new()),
        state: state.clone(),
        start_init: RefCell::new(Some(start_tx)),
    });
    let table = build_table(ctx);
    let entries = match cli.config.as_deref().map(config::read).transpose() {
        Ok(e) => e.unwrap_or_default(),
        Err(e) => return fail(e),
    };
    let ignore = cli.json_ignore_init_errors;

    let mut remaining = entries;
    if cli.wait_for_rpc {
        match config::apply(&table, remaining, RpcState::Startup, ignore).await {
            Ok(skipped) => remaining = skipped,
            Err(e) => return fail(e),
        }
    }
    // As SPDK: with --wait-for-rpc the socket serves the start-up phase;
    // otherwise it opens only once the configuration is loaded, so a client
    // that waits for the socket finds every configured object in place.
    let start_server = |table: &Rc<RpcTable>| match RpcServer::start(
        &cli.rpc_socket,
        table.clone(),
        state.clone(),
    ) {
        Ok(server) => {
            // Registered last, so it runs first at shutdown.
            reactor::on_shutdown(move || async move { server.stop() });
            true
        }
        Err(e) => {
            fail(format!("RPC server on {}: {e}", cli.rpc_socket.display()));
            false
        }
    };
    if cli.wait_for_rpc {
        if !start_server(&table) {
            return;
        }
        log::info!("waiting for framework_start_init");
        if start_rx.await.is_err() {
            return;
        }
        state.set(RpcState::Runtime);
    }
    if let Err(e) = config::apply(&table, remaining, RpcState::Runtime, ignore).await {
        return fail(e);
    }
    if !cli.wait_for_rpc && !start_server(&table) {
        return;
    }
    state.set(RpcState::Runtime);
    log::info!(
        "ferroplane ready: {} reactor(s) on cores {}, RPC on {}",
        reactor::cores().len(),
        reactor::core_set().mask_string(),
        cli.rpc_socket.display()
    );
}
