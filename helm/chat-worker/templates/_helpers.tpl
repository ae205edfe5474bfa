{{/* Names, labels and the few decisions several templates share. */}}

{{- define "chat-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or just the release when it already contains the chart name. */}}
{{- define "chat-worker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chat-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chat-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chat-worker.labels" -}}
helm.sh/chart: {{ include "chat-worker.chart" . }}
{{ include "chat-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: worker
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "chat-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chat-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chat-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret the pods read: the existing one, or the chart's own. */}}
{{- define "chat-worker.secretName" -}}
{{- default (include "chat-worker.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Whether the chart renders its own Secret: no existing one and something to store. */}}
{{- define "chat-worker.createSecret" -}}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.upstreamApiKey .Values.secrets.amqpUrl) }}true{{ end }}
{{- end }}

{{/* Whether the broker URL is available from a Secret (for the pods and for KEDA). */}}
{{- define "chat-worker.hasAmqpUrl" -}}
{{- if or .Values.secrets.existingSecret .Values.secrets.amqpUrl }}true{{ end }}
{{- end }}

{{/* KEDA scales the Deployment: autoscaling and KEDA on, and the cluster serves its API. */}}
{{- define "chat-worker.kedaActive" -}}
{{- if and .Values.autoscaling.enabled .Values.autoscaling.keda.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1") }}true{{ end }}
{{- end }}

{{/* The CPU HorizontalPodAutoscaler is the fallback when KEDA is off or absent. */}}
{{- define "chat-worker.hpaActive" -}}
{{- if and .Values.autoscaling.enabled (not (include "chat-worker.kedaActive" .)) }}true{{ end }}
{{- end }}

{{- define "chat-worker.serviceMonitorActive" -}}
{{- if and .Values.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{/*
A number as the worker reads it: whole numbers without a decimal point or exponent
(values arrive as float64, and 10485760 would otherwise print as 1.048576e+07).
*/}}
{{- define "chat-worker.number" -}}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* Seconds the kubelet waits after SIGTERM: the worker's drain plus a margin. */}}
{{- define "chat-worker.terminationGracePeriodSeconds" -}}
{{- add (int64 (ceil .Values.config.shutdownGrace)) .Values.terminationGraceExtraSeconds }}
{{- end }}

{{/* The console's pods carry their own name label, so no worker selector (Deployment,
Service, PodDisruptionBudget, spread) ever matches them. */}}
{{- define "chat-worker.consoleName" -}}
{{- printf "%s-console" (include "chat-worker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chat-worker.consoleSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-console" (include "chat-worker.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chat-worker.consoleLabels" -}}
helm.sh/chart: {{ include "chat-worker.chart" . }}
{{ include "chat-worker.consoleSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: console
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding the console token, if any: the existing one, or the chart's own. */}}
{{- define "chat-worker.consoleTokenSecret" -}}
{{- if .Values.console.existingSecret }}{{ .Values.console.existingSecret }}
{{- else if .Values.console.token }}{{ include "chat-worker.consoleName" . }}
{{- end }}
{{- end }}

{{/*
The lanes' queue names of config.requestQueue ("chat.interactive:4,chat.batch:1"), as a
JSON array: the weights are the worker's business, the backlogs KEDA's.
*/}}
{{- define "chat-worker.laneQueues" -}}
{{- $queues := list }}
{{- range splitList "," .Values.config.requestQueue }}
{{- $queue := regexReplaceAll ":[0-9]+$" (trim .) "" }}
{{- if $queue }}{{ $queues = append $queues $queue }}{{ end }}
{{- end }}
{{- toJson $queues }}
{{- end }}

{{/*
Where the upstreams file is mounted in the container.
*/}}
{{- define "chat-worker.upstreamsFile" -}}
/etc/chat-worker/upstreams.yaml
{{- end }}

{{/* The gateway's pods carry their own name label, like the console's. */}}
{{- define "chat-worker.gatewayName" -}}
{{- printf "%s-gateway" (include "chat-worker.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chat-worker.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-gateway" (include "chat-worker.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chat-worker.gatewayLabels" -}}
helm.sh/chart: {{ include "chat-worker.chart" . }}
{{ include "chat-worker.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret holding WORKER_DATABASE_URL: the existing one, or the chart's own. */}}
{{- define "chat-worker.gatewayDatabaseSecret" -}}
{{- default (include "chat-worker.gatewayName" .) .Values.gateway.database.existingSecret }}
{{- end }}

{{/* Where the gateway's keys Secret is mounted. */}}
{{- define "chat-worker.gatewayKeysDir" -}}
/etc/chat-worker/gateway-keys
{{- end }}

{{/*
The gateway's refusals, in one place: several replicas (or an autoscaler that may make
several) on a SQLite file each pod would keep apart; a database URL from nowhere.
*/}}
{{- define "chat-worker.gatewayChecks" -}}
{{- $g := .Values.gateway -}}
{{- if not $g.database.existingSecret }}
{{- if not $g.database.url }}
{{- fail "gateway.database: set gateway.database.url or gateway.database.existingSecret" }}
{{- end }}
{{- $several := or (gt (int64 $g.replicaCount) 1) (and $g.autoscaling.enabled (gt (int64 $g.autoscaling.maxReplicas) 1)) }}
{{- if and (hasPrefix "sqlite" $g.database.url) $several }}
{{- fail "gateway: several replicas need PostgreSQL; with a sqlite: gateway.database.url keep gateway.replicaCount at 1 and gateway.autoscaling off, or set a postgresql:// URL" }}
{{- end }}
{{- end }}
{{- if and $g.autoscaling.enabled (gt (int64 $g.autoscaling.minReplicas) (int64 $g.autoscaling.maxReplicas)) }}
{{- fail "gateway.autoscaling.minReplicas must not exceed gateway.autoscaling.maxReplicas" }}
{{- end }}
{{- end }}
